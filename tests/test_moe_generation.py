"""Routing under KV-cache decoding, and the generation benchmark.

A cached decode step routes one new token per row; the same token inside one full forward over
the final sequence must get the same experts and gates, or generation with the cache is not the
model that was trained (and evaluated without it)."""

from __future__ import annotations

import json

import pytest
import torch

from sparsedoc.bench.generation import (VARIANTS, build_moe, format_generation,
                                        measure_generation, randomise_adapters)
from sparsedoc.moe.router import TopKRouter

NEW_TOKENS = 8
PROMPTS = [[1, 5, 17, 300, 2000, 42, 7, 99, 1000, 3], [10, 20, 30, 40, 50, 60]]


class RouterTap:
    """Forward hooks on every router: the (top_idx, top_gates) of each call, per router, with the
    call's (B, S) shape. A hook, not a RoutingRecorder: generate runs many forwards."""

    def __init__(self, model):
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.handles = []
        for name, m in model.named_modules():
            if isinstance(m, TopKRouter):
                self.calls[name] = []
                self.handles.append(m.register_forward_hook(self._hook(name)))
        assert self.calls, "no router in the model"

    def _hook(self, name):
        def hook(module, args, out):
            x = args[0]
            B, S = x.shape[0], x.shape[1] if x.dim() == 3 else 1
            _, _, top_idx, gates = out
            self.calls[name].append((top_idx.view(B, S, -1).clone(), gates.view(B, S, -1).clone()))
        return hook

    def per_position(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Each router's calls concatenated along the sequence: (B, S_total, k) idx and gates."""
        return {n: (torch.cat([c[0] for c in calls], 1), torch.cat([c[1] for c in calls], 1))
                for n, calls in self.calls.items()}

    def close(self):
        for h in self.handles:
            h.remove()


def _batch(rows: list[list[int]], pad: int = 0) -> dict[str, torch.Tensor]:
    """Left-padded ids and attention mask, as generation with a batch needs."""
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask}


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """The position ids generate derives from a left-padded mask (pads at 1, as HF does)."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)


def assert_cached_routing_matches_full_forward(model, rows: list[list[int]]) -> None:
    """Greedy cached generation routes every real token as one full forward over the result
    does, and yields the same tokens as generation without the cache."""
    inputs = _batch(rows)
    gen_kw = dict(do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                  pad_token_id=0)
    tap = RouterTap(model)
    try:
        with torch.no_grad():
            seq = model.generate(**inputs, use_cache=True, **gen_kw)
            cached = tap.per_position()
            assert len(next(iter(tap.calls.values()))) == NEW_TOKENS  # prefill + 7 steps
            for calls in tap.calls.values():
                calls.clear()
            no_cache = model.generate(**inputs, use_cache=False, **gen_kw)
            for calls in tap.calls.values():
                calls.clear()
            mask = torch.cat([inputs["attention_mask"],
                              torch.ones(len(rows), NEW_TOKENS, dtype=torch.long)], 1)
            model(input_ids=seq, attention_mask=mask, position_ids=_positions(mask))
            full = tap.per_position()
    finally:
        tap.close()
    assert torch.equal(seq, no_cache), "cached and uncached greedy generation differ"
    # the cached run processed every token but the last generated one
    real = mask[:, :-1].bool()  # (B, S-1)
    for name, (idx_c, gate_c) in cached.items():
        idx_f, gate_f = full[name][0][:, :-1], full[name][1][:, :-1]
        assert idx_c.shape == idx_f.shape, name
        # compare expert sets (order within the top-k is by gate, ties could swap it)
        sc, order_c = idx_c.sort(-1)
        sf, order_f = idx_f.sort(-1)
        same = (sc == sf).all(-1)  # (B, S-1)
        bad = real & ~same
        assert not bad.any(), (f"{name}: cached decoding chose other experts than the full "
                               f"forward at (row, position) {bad.nonzero().tolist()[:5]}")
        torch.testing.assert_close(gate_c.gather(-1, order_c)[real],
                                   gate_f.gather(-1, order_f)[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw", [dict(), dict(router_scope="block"), dict(mode="ffn")],
                         ids=["linear-module", "linear-block", "ffn"])
@pytest.mark.parametrize("rows", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch2-leftpad"])
def test_cached_decoding_routes_as_the_full_forward(tiny_model_dir, kw, rows):
    model = build_moe(str(tiny_model_dir), num_experts=4, top_k=2, r=4, **kw)
    assert_cached_routing_matches_full_forward(model, rows)


@pytest.fixture(scope="module")
def routed_export(tiny_model_dir, toy_data, tmp_path_factory):
    """A routed export made by the ``sparsedoc export`` API from a saved adapter, reloaded."""
    import sparsedoc
    from sparsedoc.config import MoECfg
    from sparsedoc.export import ExportOptions, export
    from sparsedoc.moe.inject import inject_lora_moe, save_moe_adapter

    tmp = tmp_path_factory.mktemp("routed")
    cfg = MoECfg(num_experts=4, top_k=2, r=4, dropout=0.0)
    model = sparsedoc.load_pretrained(str(tiny_model_dir), dtype=torch.float32)
    inject_lora_moe(model, cfg)
    randomise_adapters(model)
    save_moe_adapter(model, tmp / "adapter", cfg, str(tiny_model_dir), "dense")
    meta = export(tmp / "adapter", tmp / "out", ExportOptions(data=[str(toy_data[1])]))
    assert meta["mode"] == "routed"
    return sparsedoc.load_pretrained(str(tmp / "out"), dtype=torch.float32).eval()


@pytest.mark.parametrize("rows", [PROMPTS[:1], PROMPTS], ids=["batch1", "batch2-leftpad"])
def test_routed_export_cached_decoding_routes_as_the_full_forward(routed_export, rows):
    assert type(routed_export).__name__ == "SparsedocMoEForCausalLM"
    assert_cached_routing_matches_full_forward(routed_export, rows)


def test_measure_generation_on_a_tiny_llama(tiny_model_dir):
    result = measure_generation(str(tiny_model_dir), batch_sizes=(1, 2), new_tokens=3,
                                prompt_len=4, rounds=2)
    json.dumps(result)  # the CLI writes it as is
    rows = {(r["variant"], r["batch"]): r for r in result["rows"]}
    assert set(rows) == {(v, b) for v in VARIANTS for b in (1, 2)}
    for r in rows.values():
        assert r["tok_s_min"] > 0 and r["tok_s_min"] <= r["tok_s"] <= r["tok_s_max"]
        assert len(r["seconds"]) == 2 and r["vs_base"] > 0
    assert rows[("base", 1)]["vs_base"] == 1.0
    table = format_generation(result)
    assert table.count("\n| ") == len(rows) + 1 and "| routed | 2 |" in table


def test_measure_generation_refuses_an_unknown_variant(tiny_model_dir):
    with pytest.raises(ValueError, match="not in"):
        measure_generation(str(tiny_model_dir), variants=("base", "mixlora"))
