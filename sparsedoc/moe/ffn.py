"""FFN-expert mode (MixLoRA-style): a router per MLP block picks k whole LoRA-adapted FFN experts.

Expert e is the frozen MLP with its own LoRA on each projection::

    FFN_e(x) = (W_d + s B^d_e A^d_e) [ act((W_g + s B^g_e A^g_e) x) * ((W_u + s B^u_e A^u_e) x) ]
    y = sum_{e in topk(x)} g_e(x) FFN_e(x),     gates renormalised over the chosen k (Mixtral)

Because each expert is a whole FFN, the model is exactly a Mixtral sparse-MoE block whose expert
weights are ``base + LoRA delta`` and whose gate is the router: ``sparsedoc.export`` writes it as a
stock ``MixtralForCausalLM``. The gates must sum to one for B=0 to give the base MLP back, hence
top-k >= 2 with renormalisation (top-1 would make every gate 1 and leave the router no LM-loss
gradient). The attention projections get a plain LoRA (``LoRALinear``), which merges exactly.

Dispatch is grouped: the frozen gate/up projections run once over all tokens, then each expert
adds its low-rank terms on its own tokens; the frozen down projection, being linear, runs once
per token on the gate-weighted sum of the experts' activations. Dense dispatch would run all E FFNs for every token, E/k times the work.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from sparsedoc.moe.record import ExpertSample, active_recorder
from sparsedoc.moe.router import TopKRouter


def is_silu(act: nn.Module) -> bool:
    """Llama's MLP activation, as torch or transformers spell it."""
    return isinstance(act, nn.SiLU) or type(act).__name__ == "SiLUActivation"


class SiluMul(torch.autograd.Function):
    """``silu(g) * u`` keeping only ``g`` and ``u`` for the backward (silu(g) is recomputed
    there): one (rows, intermediate) tensor per FFN fewer than autograd's two ops would keep."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(g, u)
        return torch.nn.functional.silu(g) * u

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g, u = ctx.saved_tensors
        sig = torch.sigmoid(g)
        d_g = grad * u * (sig * (1 + g * (1 - sig)))  # d silu / dg = sig (1 + g (1 - sig))
        return d_g, grad * (g * sig)


class LoRALinear(nn.Module):
    """A frozen linear plus one plain LoRA, ``y = W x + s B A dropout(x)`` (peft's maths)."""

    def __init__(self, base_layer: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base_layer = base_layer
        for p in base_layer.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.r, self.scaling = r, alpha / r
        dtype = base_layer.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lora_dropout(x).to(self.lora_A.dtype)
        delta = (h @ self.lora_A.t()) @ self.lora_B.t()
        return self.base_layer(x) + (self.scaling * delta).to(x.dtype)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A": self.lora_A, "lora_B": self.lora_B}

    @torch.no_grad()
    def delta_weight(self) -> torch.Tensor:
        return self.scaling * (self.lora_B @ self.lora_A)


PROJ = ("gate", "up", "down")


class LoRAMoEFFN(nn.Module):
    """Replaces a Llama-style MLP (``gate_proj``, ``up_proj``, ``down_proj``, ``act_fn``) with E
    routed LoRA-adapted copies of it (see module docstring). Records into the active
    ``RoutingRecorder`` exactly as ``LoRAMoELinear`` does, so losses, telemetry and analysis
    treat both modes alike."""

    router_leader = owns_router = True
    record_name: str = ""  # set by inject_lora_moe

    def __init__(self, mlp: nn.Module, num_experts: int, top_k: int, r: int, alpha: float,
                 dropout: float = 0.0, router_jitter: float = 0.0):
        super().__init__()
        if top_k < 2:
            raise ValueError("FFN-expert mode needs top_k >= 2 (gates are renormalised over the "
                             "chosen experts, Mixtral-style)")
        for name in ("gate_proj", "up_proj", "down_proj", "act_fn"):
            if not hasattr(mlp, name):
                raise ValueError(f"FFN-expert mode wraps Llama-style MLPs; {type(mlp).__name__} "
                                 f"has no {name}")
        self.base_mlp = mlp
        for p in mlp.parameters():
            p.requires_grad_(False)
        hidden, inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        self.hidden_size, self.intermediate_size = hidden, inter
        self.num_experts, self.top_k, self.r = num_experts, top_k, r
        self.scaling = alpha / r
        dtype = mlp.gate_proj.weight.dtype
        shapes = {"gate": (inter, hidden), "up": (inter, hidden), "down": (hidden, inter)}
        for p, (out_f, in_f) in shapes.items():
            A = nn.Parameter(torch.empty(num_experts, r, in_f, dtype=dtype))
            for e in range(num_experts):
                nn.init.kaiming_uniform_(A.data[e], a=math.sqrt(5))
            setattr(self, f"lora_A_{p}", A)
            setattr(self, f"lora_B_{p}", nn.Parameter(torch.zeros(num_experts, out_f, r,
                                                                  dtype=dtype)))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.router = TopKRouter(hidden, num_experts, top_k, router_jitter)

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"experts={self.num_experts}, top_k={self.top_k}, r={self.r}")

    def _lora(self, p: str, e: int, h: torch.Tensor) -> torch.Tensor:
        A, B = getattr(self, f"lora_A_{p}")[e], getattr(self, f"lora_B_{p}")[e]
        return self.scaling * ((h @ A.t()) @ B.t())

    def _lora_onto(self, base: torch.Tensor, p: str, e: int, h: torch.Tensor) -> torch.Tensor:
        """``base + s B_e A_e h``, the up-projection accumulating into ``base`` (addmm)."""
        A, B = getattr(self, f"lora_A_{p}")[e], getattr(self, f"lora_B_{p}")[e]
        return torch.addmm(base, (h @ A.t()).to(base.dtype), B.t().to(base.dtype),
                           alpha=self.scaling)

    def _all_experts_lora(self, p: str, h: torch.Tensor) -> torch.Tensor:
        """(n, in) -> (n, E, out): every expert's LoRA term of projection ``p`` on ``h``."""
        A, B = getattr(self, f"lora_A_{p}"), getattr(self, f"lora_B_{p}")
        xa = torch.einsum("eri,ni->ner", A, h) if h.dim() == 2 else torch.einsum("eri,nei->ner",
                                                                                  A, h)
        return self.scaling * torch.einsum("eor,ner->neo", B, xa)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mlp = self.base_mlp
        batch_shape = tuple(x.shape[:-1])
        h = x.reshape(-1, self.hidden_size)
        routing = self.router.route(x)
        recorder = active_recorder()
        sample = None
        if recorder is not None:
            recorder.add_routing(self.record_name, routing)
            if recorder.input_rows is not None:
                recorder.add_router_input(self.record_name, h)
            if recorder.sample_rows is not None:
                sample = recorder.sample_rows.to(x.device)
                sample = sample[sample < h.shape[0]]
        T, k = routing.top_idx.shape
        # (token, expert) rows sorted by expert, so each expert's rows are one contiguous slice
        flat_expert = routing.top_idx.reshape(-1)
        order = flat_expert.argsort(stable=True)
        tok = torch.arange(T, device=x.device).repeat_interleave(k)[order]
        gates = routing.top_gates.reshape(-1)[order]
        counts = torch.bincount(flat_expert, minlength=self.num_experts).tolist()
        base_g, base_u = mlp.gate_proj(h), mlp.up_proj(h)  # once per token, shared by experts
        hd = self.lora_dropout(h).to(self.lora_A_gate.dtype)
        g_rows, u_rows, spans, start = [], [], [], 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            t = tok[start:start + n]
            g_rows.append(self._lora_onto(base_g[t], "gate", e, hd[t]))
            u_rows.append(self._lora_onto(base_u[t], "up", e, hd[t]))
            spans.append((e, start, n))
            start += n
        g, u = torch.cat(g_rows), torch.cat(u_rows)  # (T*k, inter)
        del g_rows, u_rows
        act = SiluMul.apply(g, u) if is_silu(mlp.act_fn) else mlp.act_fn(g) * u
        act_d = self.lora_dropout(act).to(self.lora_A_down.dtype)
        gate_col = gates.unsqueeze(-1).to(act.dtype)
        # The frozen down projection is linear: sum_e g_e W_d a_e = W_d (sum_e g_e a_e), so it
        # runs once per token on the gate-mixed activation, not once per (token, expert) row.
        # A bias (none in a Llama MLP) is added once, as the gates sum to one.
        # rows back in (token, slot) order and summed over the k slots: a gather and a sum keep
        # only the index for the backward, where index_add would keep its (T*k, .) source
        unsort = order.argsort()
        mixed = (act * gate_col)[unsort].view(T, k, -1).sum(1)
        n_sample = 0
        if sample is not None:
            # FFN_e(x) - FFN(x) = W_d (a_e - a) + s B^d_e A^d_e a_e, with a_e the expert's and a
            # the frozen MLP's activation: the difference a_e - a goes through W_d (no bias in a
            # Llama MLP), so the base output never has to be subtracted (in bf16 that would
            # leave mostly rounding noise). Its rows join the one down-projection call below
            # (ZeRO-3 gathers W_d once per forward).
            n_sample, E, inter = len(sample), self.num_experts, self.intermediate_size
            g_s = base_g[sample].unsqueeze(1) + self._all_experts_lora("gate", hd[sample])
            u_s = base_u[sample].unsqueeze(1) + self._all_experts_lora("up", hd[sample])
            act_s = mlp.act_fn(g_s.to(base_g.dtype)) * u_s.to(base_u.dtype)  # (n, E, inter)
            act_base = mlp.act_fn(base_g[sample]) * base_u[sample]  # (n, inter)
            lora_s = self._all_experts_lora(
                "down", self.lora_dropout(act_s).to(self.lora_A_down.dtype))  # (n, E, hidden)
            mixed = torch.cat([mixed, (act_s - act_base.unsqueeze(1)).reshape(n_sample * E,
                                                                                inter)])
        down = mlp.down_proj(mixed)  # one call over all rows (ZeRO-3 gathers W_d once)
        if sample is not None:
            outputs = down[T:].view(n_sample, self.num_experts, self.hidden_size)
            if mlp.down_proj.bias is not None:  # W_d (a_e - a) carries no bias
                outputs = outputs - mlp.down_proj.bias
            outputs = outputs + lora_s.to(down.dtype)
            recorder.add_expert_outputs(self.record_name, ExpertSample(
                sample, outputs, routing.top_idx[sample], routing.top_gates[sample]))
            down = down[:T]
        # each expert's own down LoRA on its rows, gated, summed into its tokens
        lora_down = torch.cat([self._lora("down", e, act_d[s:s + n]) for e, s, n in spans])
        lora_down = (lora_down * gate_col.to(lora_down.dtype))[unsort].view(T, k, -1).sum(1)
        out = down + lora_down.to(down.dtype)
        return out.view(*batch_shape, self.hidden_size)

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        out = {f"lora_{ab}_{p}": getattr(self, f"lora_{ab}_{p}") for p in PROJ for ab in "AB"}
        out["router.weight"] = self.router.weight
        out["router.shared_direction"] = self.router.shared_direction
        return out

    @torch.no_grad()
    def delta_weight(self, proj: str, expert: int) -> torch.Tensor:
        """Dense ``s * B_e A_e`` of one projection ("gate", "up", "down") of one expert."""
        return self.scaling * (getattr(self, f"lora_B_{proj}")[expert]
                               @ getattr(self, f"lora_A_{proj}")[expert])

    @torch.no_grad()
    def expert_weights(self, expert: int) -> dict[str, torch.Tensor]:
        """Full (gate, up, down) weights of one expert: frozen weight + its LoRA delta."""
        return {p: getattr(self.base_mlp, f"{p}_proj").weight + self.delta_weight(p, expert)
                for p in PROJ}
