"""The meta-device dry run counts what a real build counts, and its FLOPs and memory add up."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaForCausalLM

from sparsedoc.bench import dryrun
from sparsedoc.config import load_config
from sparsedoc.methods import new_method
from sparsedoc.methods.base import count_parameters

LLAMA3_8B_PARAMS = 8_030_261_248  # the published Llama-3-8B parameter count


@pytest.fixture(scope="module")
def tiny_result():
    return dryrun.dry_run("tiny", seq_len=128)


def _projection_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of the seven projections of one decoder layer, from the config alone."""
    h, i = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (h // config.num_attention_heads)
    return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]


@pytest.mark.parametrize("variant", list(dryrun.variant_overrides()))
def test_meta_counts_equal_a_real_cpu_build(tiny_result, variant):
    torch.manual_seed(0)
    overrides = dryrun.variant_overrides()[variant]
    cfg = load_config(None, overrides)
    model = LlamaForCausalLM(dryrun.llama_config("tiny"))  # real CPU tensors
    model = new_method(cfg.adapter.method).build(model, cfg)
    assert all(p.device.type == "cpu" for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    row = next(v for v in tiny_result["variants"] if v["name"] == variant)
    assert (row["trainable"], row["total"]) == (trainable, total)


@pytest.mark.parametrize("variant", list(dryrun.variant_overrides()))
def test_meta_build_allocates_nothing(variant):
    overrides = dryrun.variant_overrides()[variant]
    model = dryrun.build_variant(dryrun.llama_config("tiny"), overrides)
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert {b.device.type for b in model.buffers()} == {"meta"}


def test_lora_expert_flops_equal_the_hand_formula(tiny_result):
    config, r = dryrun.llama_config("tiny"), 16
    per_layer = sum(r * (i + o) for i, o in _projection_shapes(config))
    row = next(v for v in tiny_result["variants"] if v["name"] == "lora")
    assert row["trainable"] == config.num_hidden_layers * per_layer
    assert row["expert_flops"] == 2 * config.num_hidden_layers * per_layer  # 2 x MACs
    assert row["expert_flops_dense"] == row["expert_flops"]


def test_moe_expert_flops_route_k_of_e_and_dense_computes_all(tiny_result):
    config, E, k, r = dryrun.llama_config("tiny"), 8, 2, 8
    shapes = _projection_shapes(config)
    router = sum(2 * i * E for i, _ in shapes)
    lora = sum(2 * r * (i + o) for i, o in shapes)
    row = next(v for v in tiny_result["variants"] if v["name"] == "lora_moe")
    assert row["expert_flops"] == config.num_hidden_layers * (k * lora + router)
    assert row["expert_flops_dense"] == config.num_hidden_layers * (E * lora + router)


def test_ffn_mode_expert_flops_are_attention_lora_plus_k_experts_and_router(tiny_result):
    config, E, k, r = dryrun.llama_config("tiny"), 8, 2, 8
    h, i, L = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    attention_lora = sum(2 * r * (a + b) for a, b in _projection_shapes(config)[:4])
    ffn = k * 3 * 2 * r * (h + i) + 2 * h * E
    row = next(v for v in tiny_result["variants"] if v["name"] == "lora_moe_ffn")
    assert row["expert_flops"] == L * (attention_lora + ffn)


def test_base_flops_are_linears_plus_attention(tiny_result):
    config, seq = dryrun.llama_config("tiny"), 128
    h, L = config.hidden_size, config.num_hidden_layers
    linears = L * sum(2 * i * o for i, o in _projection_shapes(config)) \
        + 2 * h * config.vocab_size  # lm_head
    assert tiny_result["base"] == {"linear": linears, "attention": L * 4 * seq * h,
                                   "total": linears + L * 4 * seq * h}


def test_llama3_8b_total_on_meta():
    model = dryrun.build_variant(dryrun.llama_config("llama3-8b"),
                                 dryrun.variant_overrides()["full"])
    assert count_parameters(model) == (LLAMA3_8B_PARAMS, LLAMA3_8B_PARAMS)
    assert dryrun.largest_layer_params(model) == 128256 * 4096  # embeddings / lm_head


def test_smollm2_total_on_meta():
    model = dryrun.build_variant(dryrun.llama_config("smollm2"),
                                 dryrun.variant_overrides()["full"])
    assert count_parameters(model)[1] == 134_515_008  # SmolLM2-135M, tied embeddings


@pytest.mark.parametrize("nodes,per_node", dryrun.CLUSTERS)
def test_full_fine_tune_breakdown_against_deepspeed(nodes, per_node):
    P, largest, n = LLAMA3_8B_PARAMS, 128256 * 4096, nodes * per_node
    ds = dryrun.deepspeed_estimates(P, nodes, per_node, largest)
    z2 = dryrun.zero_breakdown(P, P, n, stage=2)
    z3 = dryrun.zero_breakdown(P, P, n, stage=3, largest_layer=largest)
    # ZeRO-2: the same bytes, 2 P replicated + 18 P / N, up to integer rounding per term
    assert abs(z2["total"] - ds["zero2"]) <= 8
    # ZeRO-3: DeepSpeed's 18 bytes / param include the partitioned 16-bit weights; ours adds
    # the bf16 gradient partition its ZeRO-2 comment counts (zero_breakdown's docstring)
    assert abs(z3["total"] - ds["zero3"] - 2 * P // n) <= 8


def test_peft_breakdown_holds_the_frozen_base_without_optimizer_states():
    P, Pt = LLAMA3_8B_PARAMS, 40_000_000
    z2 = dryrun.zero_breakdown(P, Pt, 8, stage=2)
    z3 = dryrun.zero_breakdown(P, Pt, 8, stage=3)
    assert z2["frozen_bf16_weights"] == 2 * (P - Pt)  # replicated under ZeRO-2
    assert z3["frozen_bf16_weights"] == 2 * (P - Pt) // 8  # partitioned under ZeRO-3
    assert z2["adam_m_v"] == 8 * Pt // 8


def test_result_is_json_and_the_table_has_every_variant(tiny_result):
    json.dumps(tiny_result)
    table = dryrun.format_dry_run(tiny_result)
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [r.split("|")[1].strip() for r in rows[1:]] == list(dryrun.variant_overrides())
    assert "ZeRO-3 GB 2x8" in rows[0]
