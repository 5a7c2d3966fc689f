"""LoRAMoELinear: a frozen linear plus E routed LoRA experts.

    y = W x + s * sum_{e in topk(x)} g_e(x) * B_e A_e dropout(x)      (s = alpha / r)
            [+ s * B_shared A_shared dropout(x)  when a shared expert is on]

Experts are stored stacked, ``lora_A: (E, r, in)`` and ``lora_B: (E, out, r)`` with B zero, so a
fresh layer returns the base output exactly. The frozen weight is wrapped (``base_layer``), never
copied. Two batched dispatches compute the expert sum:

* ``dense``: project every token through every A in one einsum, weight by the (mostly zero) gate
  matrix, then one matmul against all B. Wasteful by E/k in LoRA FLOPs, but those are ~1-3% of the
  frozen matmul at r << d, and it is a handful of large kernels. It won on CPU and is ``auto``.
* ``grouped``: sort token-expert assignments by expert and run each expert on its own tokens.
  Exact FLOPs, but E small kernels plus gather/scatter; better only when E*r approaches d.

The router's latest output stays on the layer (``last_routing``) for the losses and telemetry to
collect after the forward; nothing is accumulated across forwards.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsedoc.moe.memory_queue import MemoryQueue
from sparsedoc.moe.router import RouterOutput, TopKRouter


def dense_dispatch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: RouterOutput
                   ) -> torch.Tensor:
    """x: (T, in), A: (E, r, in), B: (E, out, r) -> (T, out). Two matmuls for all experts."""
    E, r, d_in = A.shape
    T = x.shape[0]
    xa = x @ A.reshape(E * r, d_in).t()  # (T, E*r): every expert's down-projection at once
    gates = routing.dense_gates().to(xa.dtype)  # (T, E), zeros off the top-k
    xa = (xa.view(T, E, r) * gates.unsqueeze(-1)).view(T, E * r)
    # (T, E*r) @ (E*r, out): the gated up-projections summed over experts in one matmul
    return xa @ B.permute(0, 2, 1).reshape(E * r, B.shape[1])


def grouped_dispatch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: RouterOutput
                     ) -> torch.Tensor:
    """Same contract as ``dense_dispatch``; each expert only sees its own tokens."""
    T, k = routing.top_idx.shape
    flat_expert = routing.top_idx.reshape(-1)  # (T*k,)
    flat_token = torch.arange(T, device=x.device).repeat_interleave(k)
    flat_gate = routing.top_gates.reshape(-1).to(x.dtype)
    order = flat_expert.argsort(stable=True)
    counts = torch.bincount(flat_expert, minlength=A.shape[0]).tolist()  # CPU sync, E ints
    out = x.new_zeros(T, B.shape[1])  # accumulated in place: one (T, out) buffer, not E
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start:start + n]
        start += n
        tok = flat_token[sel]
        h = (x[tok] @ A[e].t()) @ B[e].t()  # (n, out)
        out.index_add_(0, tok, h * flat_gate[sel].unsqueeze(-1))
    return out


DISPATCH = {"dense": dense_dispatch, "grouped": grouped_dispatch}


class LoRAMoELinear(nn.Module):
    """Wraps a frozen ``nn.Linear`` with routed LoRA experts (see module docstring).

    Args:
        base_layer: the frozen linear being adapted.
        num_experts, top_k, r, alpha, dropout: expert shape and gating.
        router: a shared router (one per decoder block) or None to own one.
        router_leader: with a shared router, whether this layer computes the routing for its
            block; followers reuse the leader's latest routing (same tokens, same forward).
        shared_expert: add an always-on LoRA of rank r.
        dispatch: "dense" or "grouped".
        queue_size: per-expert memory-queue length for the expert-output contrast (0: none).
    """

    def __init__(self, base_layer: nn.Linear, num_experts: int, top_k: int, r: int,
                 alpha: float, dropout: float = 0.0, router: TopKRouter | None = None,
                 router_leader: bool = True, router_jitter: float = 0.0,
                 shared_expert: bool = False, dispatch: str = "dense", queue_size: int = 0):
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        in_f, out_f = base_layer.in_features, base_layer.out_features  # ZeRO-3 safe: not .shape
        self.in_features, self.out_features = in_f, out_f
        self.num_experts, self.top_k, self.r = num_experts, top_k, r
        self.scaling = alpha / r
        self.dispatch = dispatch
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        dtype = base_layer.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(num_experts, r, in_f, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(num_experts, out_f, r, dtype=dtype))
        for e in range(num_experts):  # peft's LoRA init, expert by expert
            nn.init.kaiming_uniform_(self.lora_A.data[e], a=math.sqrt(5))
        self.shared_A = self.shared_B = None
        if shared_expert:
            self.shared_A = nn.Parameter(torch.empty(r, in_f, dtype=dtype))
            self.shared_B = nn.Parameter(torch.zeros(out_f, r, dtype=dtype))
            nn.init.kaiming_uniform_(self.shared_A.data, a=math.sqrt(5))
        self.owns_router = router is None
        if router is None:
            router = TopKRouter(in_f, num_experts, top_k, router_jitter)
            self.router = router
        else:
            # A shared router is registered on its leader only; followers keep a plain reference
            # so its parameters are not counted (or saved) once per layer.
            if router_leader:
                self.router = router
            else:
                object.__setattr__(self, "_shared_router", router)
        self.router_leader = router_leader or router is None
        self.queue = MemoryQueue(num_experts, queue_size, r) if queue_size > 0 else None
        self.last_routing: RouterOutput | None = None
        self.contrast_index: torch.Tensor | None = None  # token rows to build contrast reprs for
        self.last_contrast: tuple[torch.Tensor, torch.Tensor] | None = None

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
                f"top_k={self.top_k}, r={self.r}, dispatch={self.dispatch}, "
                f"shared_expert={self.shared_A is not None}, router_leader={self.router_leader}")

    def _route(self, h: torch.Tensor, batch_shape: tuple[int, ...]) -> RouterOutput:
        if self.router_leader:
            return self.router.route(h.view(*batch_shape, -1))
        leader = self._shared_router
        routing = getattr(leader, "latest", None)
        if routing is None or routing.probs.shape[0] != h.shape[0]:
            raise RuntimeError("block-shared router: the leader layer of this block has not routed "
                               "these tokens yet (it must run first in the block's forward)")
        return routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        batch_shape = tuple(x.shape[:-1])
        h = x.reshape(-1, self.in_features)  # (T, in)
        routing = self._route(h, batch_shape)
        if self.router_leader and not self.owns_router:
            self.router.latest = routing  # for the followers of this block, this forward
        self.last_routing = routing
        hd = self.lora_dropout(h).to(self.lora_A.dtype)
        delta = DISPATCH[self.dispatch](hd, self.lora_A, self.lora_B, routing)  # (T, out)
        if self.shared_A is not None:
            delta = delta + (hd @ self.shared_A.t()) @ self.shared_B.t()
        if self.contrast_index is not None and self.training:
            self.last_contrast = self._contrast_repr(hd, routing)
        return result + (self.scaling * delta).view(*batch_shape, -1).to(result.dtype)

    def _contrast_repr(self, hd: torch.Tensor, routing: RouterOutput
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """Low-rank outputs A_e x of the activated experts for the sampled tokens.

        Returns ``(reprs (n, k, r), expert ids (n, k))``; only the chosen experts are computed.
        """
        idx = self.contrast_index.to(hd.device)
        idx = idx[idx < hd.shape[0]]
        experts = routing.top_idx[idx]  # (n, k)
        A_sel = self.lora_A[experts]  # (n, k, r, in)
        reprs = torch.einsum("nkri,ni->nkr", A_sel, hd[idx])
        return reprs, experts

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """What an adapter file holds for this layer (the memory queue is training state)."""
        out = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.shared_A is not None:
            out.update(shared_A=self.shared_A, shared_B=self.shared_B)
        if self.router_leader:
            out["router.weight"] = self.router.weight
            out["router.shared_direction"] = self.router.shared_direction
        return out

    @torch.no_grad()
    def shared_delta_weight(self) -> torch.Tensor | None:
        """Dense ``s * B_shared A_shared`` of the always-on expert (None without one)."""
        if self.shared_A is None:
            return None
        return self.scaling * (self.shared_B @ self.shared_A)

    @torch.no_grad()
    def delta_weight(self, expert: int) -> torch.Tensor:
        """Dense ``s * B_e A_e`` (out, in) of one expert, for merges and exports."""
        return self.scaling * (self.lora_B[expert] @ self.lora_A[expert])
