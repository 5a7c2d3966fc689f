"""FFN-expert mode (MixLoRA-style) against a slow per-token reference, plus its invariants."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaMLP

from sparsedoc.config import ConfigError, MoECfg
from sparsedoc.moe.ffn import LoRALinear, LoRAMoEFFN


def make_mlp(hidden=16, inter=24, seed=0) -> LlamaMLP:
    torch.manual_seed(seed)
    mlp = LlamaMLP(LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=4,
                               num_key_value_heads=4))
    for p in mlp.parameters():
        nn.init.normal_(p, std=0.2)
    return mlp


def randomise(layer: LoRAMoEFFN) -> None:
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.startswith("lora_B"):
                p.normal_(std=0.3)
        layer.router.weight.normal_(std=1.0)


def reference(layer: LoRAMoEFFN, x: torch.Tensor) -> torch.Tensor:
    """Token by token: softmax, top-k, renormalise, run each chosen expert's full FFN."""
    out = []
    W = {p: getattr(layer.base_mlp, f"{p}_proj").weight for p in ("gate", "up", "down")}
    s = layer.scaling
    for t in x.reshape(-1, x.shape[-1]):
        probs = (layer.router.effective_weight() @ t).softmax(-1)
        top_p, top_i = probs.topk(layer.top_k)
        top_p = top_p / top_p.sum()
        y = torch.zeros_like(t)
        for p_e, e in zip(top_p, top_i.tolist()):
            w = {p: W[p] + s * getattr(layer, f"lora_B_{p}")[e] @ getattr(layer, f"lora_A_{p}")[e]
                 for p in W}
            h = layer.base_mlp.act_fn(w["gate"] @ t) * (w["up"] @ t)
            y = y + p_e * (w["down"] @ h)
        out.append(y)
    return torch.stack(out).view_as(x)


@pytest.mark.parametrize("E,k,r", [(4, 2, 4), (3, 3, 2), (8, 2, 8)])
def test_ffn_experts_match_per_token_reference(E, k, r):
    layer = LoRAMoEFFN(make_mlp(), E, k, r, alpha=2 * r)
    randomise(layer)
    x = torch.randn(2, 5, 16, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), reference(layer, x_ref)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    params = [layer.lora_A_gate, layer.lora_B_down, layer.router.weight]
    g = torch.autograd.grad(y.square().sum(), [x, *params])
    g_ref = torch.autograd.grad(y_ref.square().sum(), [x_ref, *params])
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert g[3].abs().sum() > 0  # the router learns from the LM loss through the gates


def test_ffn_sampled_expert_outputs_match_per_token_reference():
    """The expert contrast's inputs: FFN_e(x) - FFN(x) of every expert on the sampled tokens,
    recorded without changing the layer's output."""
    from sparsedoc.moe.record import record_routing

    layer = LoRAMoEFFN(make_mlp(), 4, 2, 4, alpha=8)
    randomise(layer)
    layer.record_name = "mlp"
    layer.train()
    x = torch.randn(2, 5, 16)
    plain = layer(x)
    rows = torch.tensor([1, 4, 7])
    with record_routing(sample_rows=rows) as record:
        y = layer(x)
    torch.testing.assert_close(y, plain, rtol=0, atol=1e-6)
    sample = record.expert_outputs["mlp"]
    assert sample.outputs.shape == (3, 4, 16)
    flat = x.reshape(-1, 16)
    mlp = layer.base_mlp
    for i, t in enumerate(rows.tolist()):
        for e in range(4):
            w = layer.expert_weights(e)
            h = mlp.act_fn(w["gate"] @ flat[t]) * (w["up"] @ flat[t])
            torch.testing.assert_close(sample.outputs[i, e], w["down"] @ h - mlp(flat[t]),
                                       atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sample.top_idx, record.routing["mlp"].top_idx[rows])


def test_ffn_sampled_expert_outputs_with_no_sampled_token():
    from sparsedoc.moe.record import record_routing

    layer = LoRAMoEFFN(make_mlp(), 4, 2, 4, alpha=8)
    layer.record_name = "mlp"
    x = torch.randn(1, 3, 16)
    with record_routing(sample_rows=torch.tensor([], dtype=torch.long)) as record:
        y = layer(x)
    torch.testing.assert_close(y, layer(x))
    assert record.expert_outputs["mlp"].outputs.shape == (0, 4, 16)


def test_ffn_with_zero_B_is_the_base_mlp_exactly():
    mlp = make_mlp()
    layer = LoRAMoEFFN(mlp, 4, 2, 4, alpha=8)
    with torch.no_grad():
        layer.router.weight.normal_(std=1.0)
    x = torch.randn(3, 7, 16)
    torch.testing.assert_close(layer(x), mlp(x), atol=1e-6, rtol=1e-6)


def test_expert_weights_are_base_plus_delta():
    layer = LoRAMoEFFN(make_mlp(), 4, 2, 4, alpha=8)
    randomise(layer)
    w = layer.expert_weights(2)
    s = layer.scaling
    torch.testing.assert_close(w["up"], layer.base_mlp.up_proj.weight
                               + s * layer.lora_B_up[2] @ layer.lora_A_up[2])


def test_plain_lora_linear_matches_peft_maths():
    torch.manual_seed(0)
    base = nn.Linear(10, 6, bias=False)
    lora = LoRALinear(base, r=2, alpha=4)
    with torch.no_grad():
        lora.lora_B.normal_()
    x = torch.randn(4, 10)
    merged = base.weight + lora.delta_weight()
    torch.testing.assert_close(lora(x), x @ merged.t(), atol=1e-5, rtol=1e-5)


def test_ffn_mode_config_rejects_top1():
    with pytest.raises(ConfigError, match="top_k >= 2"):
        MoECfg(mode="ffn", top_k=1)


def test_ffn_injection_on_tiny_llama(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sparsedoc.moe.inject import (adapter_state_dict, inject_lora_moe, lora_layers,
                                      moe_layers)

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    ids = torch.randint(0, 100, (2, 9))
    before = model(input_ids=ids).logits
    names = inject_lora_moe(model, MoECfg(mode="ffn", num_experts=4, top_k=2, r=4))
    assert [n for n, _ in moe_layers(model)] == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert sorted({n.rsplit(".", 1)[1] for n, _ in lora_layers(model)}) == [
        "k_proj", "o_proj", "q_proj", "v_proj"]
    assert len(names) == 2 + 8
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
    keys = adapter_state_dict(model)
    assert "model.layers.1.mlp.lora_B_down" in keys and "model.layers.0.self_attn.q_proj.lora_A" in keys
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(("lora_" in n) or ("router" in n) for n in trainable)


def test_silu_mul_gradients_match_autograd_of_silu_times_u():
    from sparsedoc.moe.ffn import SiluMul

    g = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    u = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluMul.apply, (g, u))
    torch.testing.assert_close(SiluMul.apply(g, u), torch.nn.functional.silu(g) * u)


def test_ffn_keeps_three_row_by_intermediate_tensors_for_the_backward():
    """Memory: of the (T*k, intermediate) activations only the gate and up pre-activations and
    the product are kept for the backward (the silu output is recomputed; the rows' return to
    their tokens keeps an index, not a copy). MixLoRA 0.2.3 keeps four per expert row."""
    layer = LoRAMoEFFN(make_mlp(hidden=16, inter=24), num_experts=4, top_k=2, r=2, alpha=4.0)
    randomise(layer)
    x = torch.randn(2, 7, 16, requires_grad=True)
    kept = {}

    def pack(t):
        kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x)
    row_bytes = 2 * 7 * 2 * 24 * 4  # T*k rows x intermediate, fp32
    assert sorted(kept.values()).count(row_bytes) == 3
