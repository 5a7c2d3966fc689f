"""Top-k token router for the LoRA experts.

Gates are a softmax over experts, restricted to the top k and renormalised over them (Mixtral).
With k=1 renormalising would make every gate 1 and starve the router of gradient, so top-1 uses
the raw softmax probability of the chosen expert as its gate (Switch Transformer).
Router maths runs in fp32 whatever the model dtype: small logit differences decide the top-k.

Shared-direction projection: the hidden states a layer sees share one large common direction (the
mean over tokens), so a random router ranks experts mostly by that direction and sends nearly
every token to the same k experts before training starts (measured on SmolLM2-135M: 49 of 210
layers put >90% of tokens on one expert). The router therefore scores tokens with
``W (I - u u^T)``, where ``u`` is the unit mean input measured on a few calibration batches before
training (``LoraMoEMethod.calibrate``). That is still one bias-free linear map (``effective_weight``), so it
exports as a plain gate, and it brought the same count to 0 of 210.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class Fp32Logits(torch.autograd.Function):
    """``x.float() @ w.t()`` for a low-precision ``x`` without keeping its fp32 copy for the
    backward: ``x`` is saved as it is (the frozen layer beside the router keeps it anyway) and
    cast again when the weight's gradient is computed. Autograd's own cast would hold an fp32
    (T, in) copy per router until the backward, twice a bf16 activation."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return x.float() @ w.t()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        gx = (grad @ w).to(x.dtype) if ctx.needs_input_grad[0] else None
        gw = grad.t() @ x.float() if ctx.needs_input_grad[1] else None
        return gx, gw


@dataclass
class RouterOutput:
    """One routing decision for T tokens (flattened batch x sequence)."""

    logits: torch.Tensor  # (T, E) fp32
    probs: torch.Tensor  # (T, E) fp32 softmax
    top_idx: torch.Tensor  # (T, k) chosen experts
    top_gates: torch.Tensor  # (T, k) fp32 mixing weights
    batch_shape: tuple[int, ...]  # leading shape of the layer input, e.g. (B, S)

    def dense_gates(self) -> torch.Tensor:
        """(T, E) gates with zeros for experts not chosen."""
        return torch.zeros_like(self.probs).scatter(1, self.top_idx, self.top_gates)


class TopKRouter(nn.Module):
    """Linear gate ``in_features -> num_experts`` followed by top-k selection."""

    def __init__(self, in_features: int, num_experts: int, top_k: int, jitter: float = 0.0):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, {num_experts}], got {top_k}")
        self.num_experts, self.top_k, self.jitter = num_experts, top_k, jitter
        self.in_features = in_features  # kept: under ZeRO-3 weight.shape is the shard's
        self.weight = nn.Parameter(torch.empty(num_experts, in_features))
        # std 1/sqrt(in): logits of order one, so tokens spread over experts from step 0. A much
        # smaller init leaves the probabilities uniform and lets the top-k follow whatever
        # direction all hidden states share, sending every token of a layer to the same experts.
        nn.init.normal_(self.weight, std=in_features ** -0.5)
        # Unit mean input direction removed before scoring; zero (no projection) until calibrated.
        self.register_buffer("shared_direction", torch.zeros(in_features))
        # A block-shared router's decision, from its leader to the block's other layers, within
        # one block forward (``LoRAMoELinear._route``); None between forwards.
        self.handoff: RouterOutput | None = None

    def effective_weight(self) -> torch.Tensor:
        """(E, in) fp32 ``W (I - u u^T)``: the linear map the router actually applies."""
        w, u = self.weight.float(), self.shared_direction.float()
        return w - (w @ u).unsqueeze(-1) * u

    @torch.no_grad()
    def set_shared_direction(self, mean_input: torch.Tensor) -> None:
        """Project the direction of ``mean_input`` (the mean router input over calibration
        tokens, ``sparsedoc.methods.lora_moe.LoraMoEMethod.calibrate``) out of the routing."""
        norm = mean_input.norm()
        if norm > 0:
            self.shared_direction.copy_((mean_input / norm).to(self.shared_direction))

    def route(self, x: torch.Tensor) -> RouterOutput:
        """x: (..., in_features) -> routing of the flattened tokens."""
        return RouterOutput(*self(x), batch_shape=tuple(x.shape[:-1]))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Plain tensors out (logits, probs, top_idx, gates): ZeRO-3 hooks the backward of a
        module through the tensors it returns, so a dataclass here would leave the router's
        weight un-gathered when its gradient is computed."""
        h = x.reshape(-1, x.shape[-1])  # (T, in)
        if self.training and self.jitter > 0:
            h = h.float() * torch.empty_like(h, dtype=torch.float32).uniform_(
                1.0 - self.jitter, 1.0 + self.jitter)
        w = self.effective_weight()
        logits = F.linear(h, w) if h.dtype == torch.float32 else Fp32Logits.apply(h, w)  # (T, E)
        probs = logits.softmax(dim=-1)
        top_p, top_idx = probs.topk(self.top_k, dim=-1)  # (T, k)
        gates = top_p if self.top_k == 1 else top_p / top_p.sum(-1, keepdim=True)
        return logits, probs, top_idx, gates
