"""``sparsedoc bench``: the step table is well-formed with every row, its parameter counts match
independent counts, and the peers it wraps (MixLoRA) are built right."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sparsedoc.bench.step import (FFN_PROJECTIONS, PROJECTIONS, TINY_LLAMA, build_mixlora,
                                  check_targets, format_steps)


def _tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA))


def _linears(model, names):
    return [m for n, m in model.named_modules() if n.split(".")[-1] in names]


def _peft_lora_trainable(r: int) -> int:
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_tiny(), LoraConfig(r=r, target_modules=PROJECTIONS))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.slow
def test_tiny_preset_writes_every_row_with_independent_counts(tmp_path):
    out = tmp_path / "bench.json"
    md = tmp_path / "bench.md"
    proc = subprocess.run([sys.executable, "-m", "sparsedoc.cli", "bench", "--preset", "tiny",
                           "--rounds", "1", "--steps", "1", "--warmup", "0", "--json", str(out),
                           "--markdown", str(md)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["steps"]["rows"]
    assert set(rows) == {"floor", "lora", "lora_matched", "full", "moe_dense", "moe_grouped",
                         "moe_all_experts", "moe_ffn", "mixlora", "xlora"}
    for name, row in rows.items():
        assert row["step_s"]["median"] > 0 and row["tokens_per_s"] > 0, name
        assert row["peak_mib"]["median"] > 0, name
        assert row["step_x_lora"] == pytest.approx(
            row["step_s"]["median"] / rows["lora"]["step_s"]["median"])

    base = _tiny()
    total = sum(p.numel() for p in base.parameters())
    assert rows["floor"]["trainable"] == 0 and rows["full"]["trainable"] == total
    assert rows["lora"]["trainable"] == _peft_lora_trainable(16)
    assert rows["lora_matched"]["trainable"] == _peft_lora_trainable(64)
    # per linear: E experts of rank r, each r*(in+out), and a router of E*in
    E, r = 8, 8
    moe = sum(E * r * (m.in_features + m.out_features) + E * m.in_features
              for m in _linears(base, PROJECTIONS))
    assert rows["moe_dense"]["trainable"] == rows["moe_grouped"]["trainable"] == moe
    # FFN mode: E experts of rank r on each FFN projection, one router per FFN, plain LoRA
    # r on the attention projections; MixLoRA is built to the same count
    ffn = sum(E * r * (m.in_features + m.out_features) for m in _linears(base, FFN_PROJECTIONS))
    ffn += sum(E * layer.mlp.gate_proj.in_features for layer in base.model.layers)
    ffn += sum(r * (m.in_features + m.out_features)
               for m in _linears(base, PROJECTIONS[:4]))
    assert rows["moe_ffn"]["trainable"] == rows["mixlora"]["trainable"] == ffn
    text = md.read_text()
    for row in rows.values():
        assert f"| {row['label']} |" in text
    assert "| target | measured | met |" in text


def test_mixlora_as_wrapped_equals_the_base_at_init_and_trains_router_and_experts():
    pytest.importorskip("mixlora")
    ids = torch.randint(0, TINY_LLAMA["vocab_size"], (2, 12), generator=torch.Generator()
                        .manual_seed(1))
    with torch.no_grad():
        want = _tiny()(input_ids=ids).logits
    model = build_mixlora(_tiny(), experts=4, top_k=2, r=4, seed=0)
    with torch.no_grad():  # B = 0: every expert adds nothing, gates sum to 1
        torch.testing.assert_close(model(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.endswith("mixlora_gate") for n in trainable)
    assert any("mixlora_experts" in n and "lora_B" in n for n in trainable)
    assert not any(n.endswith("mlp.down_proj.weight") for n in trainable)
    # one step: the zero Bs move, then the router has a gradient
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    model(input_ids=ids, labels=ids).loss.backward()
    gate = model.model.layers[0].mlp.mixlora_gate
    assert gate.grad is not None and gate.grad.abs().sum() > 0


def _result(step: dict[str, float], mem: dict[str, float]) -> dict:
    rows = {n: {"label": n, "step_s": {"median": s, "min": s, "max": s},
                "peak_mib": {"median": mem[n], "min": mem[n], "max": mem[n]},
                "tokens_per_s": 1 / s, "trainable": 1, "total": 2, "trainable_pct": 50.0}
            for n, s in step.items()}
    return {"spec": {"model": "m", "batch": 1, "seq": 1, "experts": 8, "top_k": 2, "r": 8,
                     "steps": 1}, "rounds": 1, "device": "cpu", "dtype": "fp32",
            "memory": "peak RSS", "rows": rows}


def test_targets_read_the_right_ratios_and_name_a_missing_row():
    result = _result({"lora": 1.0, "moe_dense": 1.05, "moe_all_experts": 1.2, "moe_ffn": 0.8},
                     {"lora": 100, "moe_dense": 120, "moe_all_experts": 120, "moe_ffn": 90})
    got = {t["target"]: (t["ratio"], t["met"]) for t in check_targets(result)}
    assert got["LoRA-MoE per linear step <= 1.10 x peft LoRA"] == (pytest.approx(1.05), True)
    assert got["LoRA-MoE per linear peak memory <= 1.15 x peft LoRA"] == (pytest.approx(1.2),
                                                                            False)
    assert got["dense all-experts >= 1.5 x the sparse path's step"] == (
        pytest.approx(1.2 / 1.05), False)
    assert got["FFN mode step <= 0.70 x MixLoRA"] == (None, None)  # no MixLoRA row
    assert "| FFN mode step <= 0.70 x MixLoRA | - | - |" in format_steps(result)


def test_queue_memory_run_fills_the_ring_once_and_then_holds_its_size():
    from sparsedoc.bench.queue import format_queue_memory, measure_queue_memory

    result = measure_queue_memory(steps=40, queue_size=16, batch=2, seq=16,
                                  checkpoints=(4, 20, 40))
    rows = result["rows"]
    assert [r["step"] for r in rows] == [4, 20, 40]
    assert [r["queue_entries"] for r in rows] == [8, 16, 16]  # 2 records a step, ring of 16
    assert len({r["queue_bytes"] for r in rows}) == 1  # allocated once, never grows
    assert result["rss_growth_mib"] < 64  # a leak of the routing state would show here
    assert "| 40 |" in format_queue_memory(result)
