"""Shared fixtures: where the real dataset samples live, and the tiny models tests train."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# The tiny-T5 fixtures live in their own module; registering it here lets tests ask for them
# by name without importing them.
pytest_plugins = ["t5_fixtures"]

REPO = Path(__file__).resolve().parents[1]
# The real dataset samples sit beside the checkout (never copied into the project).
SHARED_DATA = Path(os.environ.get("SPARSEDOC_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.fail(f"real dataset samples not found at {SHARED_DATA}; set SPARSEDOC_SHARED_DATA")
    return SHARED_DATA


EMBEDDED_CACHE = Path(os.environ.get("SPARSEDOC_CACHE", Path.home() / ".cache" / "sparsedoc"))


def make_tiny_llama(out_dir: Path, seed: int = 0) -> Path:
    """A 2-layer random Llama with the real SmolLM2 tokenizer, saved as an HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sparsedoc.config import ModelCfg
    from sparsedoc.models.load import load_tokenizer, resolve_model_path

    tok = load_tokenizer(resolve_model_path(ModelCfg()))
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    tok.save_pretrained(out_dir)
    return out_dir


def write_toy_data(out_dir: Path, n_train: int = 48, n_eval: int = 16) -> tuple[Path, Path]:
    """Labelled chat + MCQ records in the unified schema (two departments, two languages)."""
    from sparsedoc.data.schema import write_jsonl

    depts = {"cardiology": ("heart", "心脏"), "neurology": ("brain", "大脑")}

    def rec(i: int) -> dict:
        label = list(depts)[i % 2]
        en, zh = depts[label]
        if i % 3 == 2:
            return {"id": f"toy-{i}", "question": f"Which organ does {label} study? ({i})",
                    "options": {"A": en, "B": "skin", "C": "bone", "D": "eye"}, "answer": "A",
                    "explanation": f"{label} is about the {en}.",
                    "meta": {"source": "toy", "subject": label, "label": label, "lang": "en"}}
        lang = "zh" if i % 3 else "en"
        q = f"{zh}病例{i}？" if lang == "zh" else f"Case {i}: what does {label} treat?"
        a = f"这是{zh}的问题。" if lang == "zh" else f"Diseases of the {en}."
        return {"id": f"toy-{i}", "messages": [{"role": "user", "content": q},
                                               {"role": "assistant", "content": a}],
                "meta": {"source": "toy", "task": "qa", "lang": lang, "label": label}}

    train, evals = out_dir / "train.jsonl", out_dir / "eval.jsonl"
    write_jsonl(train, [rec(i) for i in range(n_train)])
    write_jsonl(evals, [rec(i) for i in range(n_train, n_train + n_eval)])
    return train, evals


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def toy_data(tmp_path_factory) -> tuple[Path, Path]:
    return write_toy_data(tmp_path_factory.mktemp("toy-data"))
