"""LoRAMoELinear against a slow per-token reference, and its invariants."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sparsedoc.moe.layer import LoRAMoELinear
from sparsedoc.moe.router import TopKRouter


def reference_forward(layer: LoRAMoELinear, x: torch.Tensor) -> torch.Tensor:
    """Obviously-correct, token by token: y_t = W x_t + s * sum_{e in topk} g_e B_e A_e x_t."""
    W, b = layer.base_layer.weight, layer.base_layer.bias
    router_w = layer.router.weight
    rows = []
    for x_t in x.reshape(-1, x.shape[-1]):
        y = W @ x_t + (b if b is not None else 0)
        p = torch.softmax(router_w.float() @ x_t.float(), dim=-1)
        top_p, top_e = torch.topk(p, layer.top_k)
        gates = top_p if layer.top_k == 1 else top_p / top_p.sum()
        for g, e in zip(gates, top_e):
            y = y + layer.scaling * g * (layer.lora_B[e] @ (layer.lora_A[e] @ x_t))
        if layer.shared_A is not None:
            y = y + layer.scaling * (layer.shared_B @ (layer.shared_A @ x_t))
        rows.append(y)
    return torch.stack(rows).view(*x.shape[:-1], -1)


def make_layer(E, k, r, d_in=12, d_out=10, shared=False, dispatch="dense", bias=True, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out, bias=bias)
    layer = LoRAMoELinear(base, E, k, r, alpha=2.0 * r, dropout=0.0, shared_expert=shared,
                          dispatch=dispatch)
    with torch.no_grad():  # non-zero B so the experts matter; distinct router logits
        layer.lora_B.normal_(std=0.5)
        layer.router.weight.normal_(std=1.0)
        if shared:
            layer.shared_B.normal_(std=0.5)
    return layer


def grads(layer, out):
    params = [layer.lora_A, layer.lora_B, layer.router.weight]
    if layer.shared_A is not None:
        params += [layer.shared_A, layer.shared_B]
    return torch.autograd.grad(out.square().sum(), params)


CASES = [(1, 1, 2, (5, 12)), (4, 1, 4, (2, 3, 12)), (4, 2, 8, (2, 7, 12)), (8, 3, 2, (3, 4, 12)),
         (6, 6, 4, (1, 9, 12))]


@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("E,k,r,shape", CASES)
def test_matches_per_token_reference(E, k, r, shape, shared, dispatch):
    layer = make_layer(E, k, r, shared=shared, dispatch=dispatch)
    x = torch.randn(*shape)
    out = layer(x)
    ref = reference_forward(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for g, g_ref in zip(grads(layer, out), grads(layer, reference_forward(layer, x))):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


def test_dense_and_grouped_agree_with_input_gradients():
    x = torch.randn(3, 5, 12, requires_grad=True)
    outs = []
    for dispatch in ("dense", "grouped"):
        layer = make_layer(6, 2, 4, dispatch=dispatch)
        out = layer(x)
        (gx,) = torch.autograd.grad(out.sum(), x)
        outs.append((out.detach(), gx))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)


def test_padding_rows_do_not_change_real_tokens():
    """No capacity limit and no cross-token mixing: appended padding leaves real outputs as they are."""
    layer = make_layer(4, 2, 4)
    x = torch.randn(2, 5, 12)
    padded = torch.cat([x, torch.zeros(2, 3, 12)], dim=1)
    torch.testing.assert_close(layer(padded)[:, :5], layer(x), rtol=0, atol=1e-6)


def test_zero_B_gives_base_output_exactly():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    layer = LoRAMoELinear(base, 4, 2, 4, alpha=8, dropout=0.0, shared_expert=True)
    x = torch.randn(3, 6, 12)
    assert torch.equal(layer(x), base(x))


def test_one_expert_top1_equals_plain_peft_lora():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 10))
    lora = get_peft_model(net, LoraConfig(r=4, lora_alpha=8, target_modules=["0"],
                                          lora_dropout=0.0))
    peft_layer = lora.base_model.model[0]
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_()
    moe = LoRAMoELinear(nn.Linear(12, 10), 1, 1, 4, alpha=8, dropout=0.0)
    with torch.no_grad():
        moe.base_layer.load_state_dict(peft_layer.base_layer.state_dict())
        moe.lora_A[0].copy_(peft_layer.lora_A["default"].weight)
        moe.lora_B[0].copy_(peft_layer.lora_B["default"].weight)
    x = torch.randn(4, 7, 12)
    torch.testing.assert_close(moe(x), lora(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("k", [1, 2])
def test_router_gets_gradient_including_top1(k):
    layer = make_layer(4, k, 4)
    out = layer(torch.randn(2, 5, 12))
    out.square().sum().backward()
    assert layer.router.weight.grad is not None
    assert layer.router.weight.grad.abs().sum() > 0


def test_frozen_base_is_wrapped_not_copied():
    base = nn.Linear(12, 10)
    layer = LoRAMoELinear(base, 2, 1, 2, alpha=4)
    assert layer.base_layer is base
    assert not base.weight.requires_grad
    assert {n for n, p in layer.named_parameters() if p.requires_grad} == {
        "lora_A", "lora_B", "router.weight"}


def test_delta_weight_reproduces_single_expert_output():
    layer = make_layer(3, 1, 4)
    x = torch.randn(6, 12)
    routing = layer.router.route(x)
    out = layer(x)
    for t in range(6):
        e = int(routing.top_idx[t, 0])
        g = routing.top_gates[t, 0]
        expect = layer.base_layer(x[t]) + g * (layer.delta_weight(e) @ x[t])
        torch.testing.assert_close(out[t], expect, rtol=1e-5, atol=1e-5)


def test_router_calibration_projects_out_the_shared_direction():
    """Hidden states with a large common offset send every token to the same expert; after
    calibration the router ignores the offset (logits invariant to it) and tokens spread out."""
    torch.manual_seed(0)
    d, E = 64, 4
    router = TopKRouter(d, E, 1)
    offset = torch.randn(d)
    offset = 100 * offset / offset.norm()
    x = torch.randn(512, d) + offset
    before = torch.bincount(router(x)[2].flatten(), minlength=E)
    assert before.max() > 0.7 * len(x)  # the offset decides the routing
    router.set_shared_direction(x.mean(0))
    u = router.shared_direction
    assert torch.allclose(u, x.mean(0) / x.mean(0).norm(), atol=1e-6)
    w_eff = router.weight - (router.weight @ u)[:, None] * u
    torch.testing.assert_close(router.effective_weight(), w_eff)
    after = torch.bincount(router(x)[2].flatten(), minlength=E)
    assert after.max() < 0.4 * len(x), after
    # moving every token along u changes nothing
    torch.testing.assert_close(router(x + 5 * u)[0], router(x)[0], atol=1e-4, rtol=1e-4)


def test_router_calibration_input_sums_ignore_padding_rows():
    """A recorded calibration forward sums the router inputs of real tokens only."""
    from sparsedoc.moe.record import record_routing

    torch.manual_seed(0)
    layer = LoRAMoELinear(nn.Linear(8, 4), num_experts=2, top_k=1, r=2, alpha=4)
    layer.record_name = "the.layer"
    x = torch.randn(6, 8)
    x[3:] = 1000.0  # padding rows that must not count
    with record_routing(input_rows=torch.tensor([True, True, True, False, False, False])) as rec:
        layer(x)
    total, count = rec.input_sums["the.layer"]
    assert count == 3
    torch.testing.assert_close(total, x[:3].double().sum(0))


def test_sampled_expert_outputs_are_every_experts_delta_on_those_tokens():
    """The expert contrast's inputs: s B_e A_e x for all E experts (chosen or not) on the
    sampled tokens, only when asked for, and the layer output is unchanged."""
    from sparsedoc.moe.record import record_routing

    torch.manual_seed(0)
    layer = LoRAMoELinear(nn.Linear(8, 6), num_experts=3, top_k=2, r=2, alpha=4)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.record_name = "lin"
    x = torch.randn(2, 4, 8)
    rows = torch.tensor([0, 5, 6])
    layer.train()
    plain = layer(x)
    with record_routing(sample_rows=rows) as record:
        y = layer(x)
    torch.testing.assert_close(y, plain, rtol=0, atol=0)
    sample = record.expert_outputs["lin"]
    flat = x.reshape(-1, 8)
    for i, t in enumerate(rows.tolist()):
        for e in range(3):
            torch.testing.assert_close(sample.outputs[i, e], layer.delta_weight(e) @ flat[t],
                                       atol=1e-6, rtol=1e-5)
    assert torch.equal(sample.top_idx, record.routing["lin"].top_idx[rows])
    with record_routing() as record:
        layer(x)
    assert record.expert_outputs == {}  # a forward that does not ask never pays for them


def test_fp32_router_logits_of_bf16_input_keep_no_fp32_copy_and_match_autograd():
    from sparsedoc.moe.router import Fp32Logits

    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 24, generator=g).bfloat16().requires_grad_(True)
    w = torch.randn(4, 24, generator=g).requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        logits = Fp32Logits.apply(x, w)
    assert logits.dtype == torch.float32
    assert sorted((str(t.dtype), tuple(t.shape)) for t in saved) == [
        ("torch.bfloat16", (16, 24)), ("torch.float32", (4, 24))]  # x as it is, no fp32 copy
    gx, gw = torch.autograd.grad(logits.square().sum(), (x, w))
    ref_logits = x.float() @ w.t()  # autograd's own cast: the reference
    rx, rw = torch.autograd.grad(ref_logits.square().sum(), (x, w))
    torch.testing.assert_close(logits, ref_logits)
    assert gx.dtype == torch.bfloat16
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
def test_bf16_layer_matches_the_fp32_per_token_reference(dispatch):
    layer = make_layer(4, 2, 4, dispatch=dispatch)
    x = torch.randn(2, 5, 12)
    ref = reference_forward(layer, x)
    out = layer.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.05)


@pytest.mark.parametrize("dispatch", ["dense", "grouped"])
def test_empty_experts_match_the_reference_and_get_zero_gradients(dispatch):
    """Every token routed to experts 0 and 1: the other experts see no token, stay exact and
    get exactly zero gradient."""
    layer = make_layer(6, 2, 4, dispatch=dispatch)
    with torch.no_grad():
        layer.router.weight.zero_()  # logits x0, x0 / 2, then -10 x0 for experts 2-5
        layer.router.weight[:, 0] = torch.tensor([1.0, 0.5, -10, -10, -10, -10])
    x = torch.randn(3, 4, 12)
    x[..., 0] = x[..., 0].abs() + 1.0
    out = layer(x)
    ref = reference_forward(layer, x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    got = grads(layer, out)
    assert got[0][2:].abs().sum() == 0 and got[1][2:].abs().sum() == 0
    for g, g_ref in zip(got, grads(layer, reference_forward(layer, x))):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)
