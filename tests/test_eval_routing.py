"""Routing analysis entry point: labelled records -> per-label expert counts, I(label; expert),
heatmaps."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sparsedoc.config import MoECfg
from sparsedoc.data.schema import read_jsonl
from sparsedoc.data.tokenize import tokenize_records
from sparsedoc.eval.routing import analyze_routing
from sparsedoc.models.load import load_tokenizer
from sparsedoc.moe.inject import inject_lora_moe, routing_layers


def test_analyze_routing_counts_every_labelled_token(tiny_model_dir, toy_data, tmp_path):
    from transformers import AutoModelForCausalLM

    tok = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    cfg = MoECfg(num_experts=4, top_k=2, router_scope="block")
    inject_lora_moe(model, cfg)
    records = read_jsonl(toy_data[1])
    res = analyze_routing(model, tok, records, tmp_path / "routing", max_seq_len=256,
                          batch_size=5)
    rows, _ = tokenize_records(records, tok, max_seq_len=256, mcq_with_explanation=False)
    tokens = {lab: sum(len(r.input_ids) for r in rows if r.label == lab)
              for lab in ("cardiology", "neurology")}
    assert res["labels"] == ["cardiology", "neurology"] and res["records"] == len(records)
    assert res["skipped"] == 0 and res["truncated"] == 0
    assert len(res["top1_counts"]) == len(routing_layers(model)) == 2  # one router per block
    for counts in res["top1_counts"].values():  # (labels, experts): every real token, once
        assert [sum(row) for row in counts] == [tokens["cardiology"], tokens["neurology"]]
    for counts in res["assigned_counts"].values():  # k experts per real token
        assert sum(counts) == cfg.top_k * sum(tokens.values())
    shares = [t / sum(tokens.values()) for t in tokens.values()]
    assert res["label_entropy_bits"] == pytest.approx(-sum(p * math.log2(p) for p in shares))
    assert 0.0 <= res["mi_bits_mean"] <= res["label_entropy_bits"]
    saved = json.loads((tmp_path / "routing" / "routing.json").read_text())
    for name, metrics in res["per_layer"].items():
        assert saved["per_layer"][name] == pytest.approx(metrics)
    assert len(res["images"]) == 3  # two block heatmaps + MI per layer
    for p in res["images"]:
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    one_label = [r for r in records if r["meta"].get("label") == "cardiology"]
    assert analyze_routing(model, tok, one_label, tmp_path / "none") is None
