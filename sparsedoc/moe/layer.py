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

The routing goes to the active ``RoutingRecorder`` (``sparsedoc.moe.record``), never onto the
layer. With a block-shared router the leader (first wrapped linear of the block) routes and hands
the decision to the block's other layers for this forward only; the last of them clears it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsedoc.moe.record import ExpertSample, active_recorder
from sparsedoc.moe.router import RouterOutput, TopKRouter


def dense_dispatch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: RouterOutput,
                   scaling: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """``out + scaling * sum_e g_e B_e A_e x`` for x: (T, in), A: (E, r, in), B: (E, out, r):
    two matmuls for all experts. The up-projection accumulates into ``out`` (the frozen layer's
    output) in the same kernel (addmm), with the scaling as its alpha: no (T, out) pass is
    spent on scaling or adding, forward or backward."""
    E, r, d_in = A.shape
    T = x.shape[0]
    xa = x @ A.reshape(E * r, d_in).t()  # (T, E*r): every expert's down-projection at once
    gates = routing.dense_gates().to(xa.dtype)  # (T, E), zeros off the top-k
    xa = (xa.view(T, E, r) * gates.unsqueeze(-1)).view(T, E * r)
    # (T, E*r) @ (E*r, out): the gated up-projections summed over experts in one matmul
    b = B.permute(0, 2, 1).reshape(E * r, B.shape[1])
    if out is None:
        return scaling * (xa @ b)
    return torch.addmm(out, xa, b, alpha=scaling)


def grouped_dispatch(x: torch.Tensor, A: torch.Tensor, B: torch.Tensor, routing: RouterOutput,
                     scaling: float = 1.0, out: torch.Tensor | None = None) -> torch.Tensor:
    """Same contract as ``dense_dispatch``; each expert only sees its own tokens."""
    T, k = routing.top_idx.shape
    flat_expert = routing.top_idx.reshape(-1)  # (T*k,)
    flat_token = torch.arange(T, device=x.device).repeat_interleave(k)
    flat_gate = routing.top_gates.reshape(-1).to(x.dtype) * scaling
    order = flat_expert.argsort(stable=True)
    counts = torch.bincount(flat_expert, minlength=A.shape[0]).tolist()  # CPU sync, E ints
    acc = x.new_zeros(T, B.shape[1])  # accumulated in place: one (T, out) buffer, not E
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[start:start + n]
        start += n
        tok = flat_token[sel]
        h = (x[tok] @ A[e].t()) @ B[e].t()  # (n, out)
        acc.index_add_(0, tok, h * flat_gate[sel].unsqueeze(-1))
    return acc if out is None else out + acc


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
    """

    # Set by ``inject_lora_moe``: the module's name (the key of its routing in a record), and,
    # for the last layer of a block-shared router's block, that it clears the hand-off.
    record_name: str = ""
    ends_block: bool = False

    def __init__(self, base_layer: nn.Linear, num_experts: int, top_k: int, r: int,
                 alpha: float, dropout: float = 0.0, router: TopKRouter | None = None,
                 router_leader: bool = True, router_jitter: float = 0.0,
                 shared_expert: bool = False, dispatch: str = "dense"):
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

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
                f"top_k={self.top_k}, r={self.r}, dispatch={self.dispatch}, "
                f"shared_expert={self.shared_A is not None}, router_leader={self.router_leader}")

    def _route(self, h: torch.Tensor, batch_shape: tuple[int, ...]) -> RouterOutput:
        if self.owns_router:
            return self.router.route(h.view(*batch_shape, -1))
        shared = self.router if self.router_leader else self._shared_router
        if self.router_leader:
            routing = shared.route(h.view(*batch_shape, -1))
            if not self.ends_block:  # a block with one wrapped linear hands nothing on
                shared.handoff = routing
            return routing
        routing = shared.handoff
        if routing is None or routing.probs.shape[0] != h.shape[0]:
            raise RuntimeError("block-shared router: the leader layer of this block has not routed "
                               "these tokens yet (it must run first in the block's forward)")
        if self.ends_block:
            shared.handoff = None  # nothing outlives the block's forward
        return routing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        batch_shape = tuple(x.shape[:-1])
        h = x.reshape(-1, self.in_features)  # (T, in)
        routing = self._route(h, batch_shape)
        hd = self.lora_dropout(h).to(self.lora_A.dtype)
        # the experts accumulate into the frozen output (no copy when the dtypes agree)
        out = result.reshape(-1, self.out_features).to(self.lora_A.dtype)
        if self.shared_A is not None:
            out = torch.addmm(out, hd @ self.shared_A.t(), self.shared_B.t(), alpha=self.scaling)
        out = DISPATCH[self.dispatch](hd, self.lora_A, self.lora_B, routing, self.scaling, out)
        recorder = active_recorder()
        if recorder is not None:
            if self.router_leader:
                recorder.add_routing(self.record_name, routing)
                if recorder.input_rows is not None:
                    recorder.add_router_input(self.record_name, h)
            if recorder.sample_rows is not None:
                recorder.add_expert_outputs(self.record_name,
                                            self._sample_expert_outputs(hd, routing,
                                                                        recorder.sample_rows))
        return out.view(*batch_shape, -1).to(result.dtype)

    def _sample_expert_outputs(self, hd: torch.Tensor, routing: RouterOutput,
                               rows: torch.Tensor) -> ExpertSample:
        """``s B_e A_e x`` of every expert (chosen or not) for the sampled token rows: the
        expert contrast's positives and negatives, in the layer's output space."""
        rows = rows.to(hd.device)
        rows = rows[rows < hd.shape[0]]
        xa = torch.einsum("eri,ni->ner", self.lora_A, hd[rows])  # (n, E, r)
        outputs = self.scaling * torch.einsum("eor,ner->neo", self.lora_B, xa)  # (n, E, out)
        return ExpertSample(rows, outputs, routing.top_idx[rows], routing.top_gates[rows])

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
