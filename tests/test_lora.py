"""sparsedoc.methods.lora: only the adapter trains, and the written adapter reloads exactly."""

from __future__ import annotations

import json

import pytest
import torch

from sparsedoc.methods.lora import LoraMethod
from sparsedoc.config import load_config
from sparsedoc.data.collate import PadCollator
from sparsedoc.data.schema import read_jsonl
from sparsedoc.data.tokenize import tokenize_records
from sparsedoc.models.load import load_tokenizer


def _base(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)


@pytest.fixture(scope="module")
def batch(tiny_model_dir, toy_data):
    tok = load_tokenizer(str(tiny_model_dir))
    rows, _ = tokenize_records(read_jsonl(toy_data[0])[:6], tok, max_seq_len=128)
    return PadCollator(tok.pad_token_id)(rows)


def _lm_inputs(batch):
    return {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}


def _is_lora(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def test_only_lora_weights_change_and_the_adapter_reloads_exactly(tiny_model_dir, batch, tmp_path):
    from peft import PeftModel

    cfg = load_config(None, ["adapter.method=lora"])  # default: r=8 on all 7 projections, p=0.05
    torch.manual_seed(0)
    model = LoraMethod().build(_base(tiny_model_dir), cfg)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(_is_lora(n) for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B x 7 projections x 2 layers
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                            weight_decay=0.0)
    model.train()  # LoRA dropout on

    def step():
        loss = model(**_lm_inputs(batch)).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()

    step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    lora_b = {n for n in trainable if ".lora_B." in n}
    # B starts at zero, so A has no gradient on the first step; every B moves
    assert changed == lora_b
    step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    for n, p in model.named_parameters():
        if not _is_lora(n):
            assert torch.equal(p, before[n]), f"frozen weight {n} changed"

    out = tmp_path / "adapter"
    LoraMethod().write_adapter(model, out)
    adapter_cfg = json.loads((out / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 8 and adapter_cfg["lora_alpha"] == 16
    assert set(adapter_cfg["target_modules"]) == set(cfg.adapter.lora.target_modules)
    from safetensors.torch import load_file
    saved = load_file(out / "adapter_model.safetensors")
    assert len(saved) == len(trainable) and all(_is_lora(k) for k in saved)  # adapter-only

    model.eval()
    reloaded = PeftModel.from_pretrained(_base(tiny_model_dir), out).eval()
    with torch.no_grad():
        want = model(**_lm_inputs(batch)).logits
        got = reloaded(**_lm_inputs(batch)).logits
        base = _base(tiny_model_dir).eval()(**_lm_inputs(batch)).logits
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (want - base).abs().max() > 1e-4  # the adapter does something: the check has teeth
