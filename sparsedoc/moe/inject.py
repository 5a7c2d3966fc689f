"""Put LoRA-MoE layers into a model, find them again, and save/load their weights.

Targets are chosen by module name: an entry ``q_proj`` matches every linear whose name ends in
``.q_proj``; an entry ``re:<regex>`` must match the full module name. The base model is frozen.
Adapter files hold experts and routers only (never the memory queues, which are training state).
"""

from __future__ import annotations

import re
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from sparsedoc import fsio
from sparsedoc.artifacts import ADAPTER_CONFIG, MOE_FORMAT, ArtifactError, read_adapter_meta
from sparsedoc.errors import UserError
from sparsedoc.config import MoECfg
from sparsedoc.moe.ffn import LoRALinear, LoRAMoEFFN
from sparsedoc.moe.layer import LoRAMoELinear
from sparsedoc.moe.router import TopKRouter

MoEModule = (LoRAMoELinear, LoRAMoEFFN)
ADAPTER_MODULES = (LoRAMoELinear, LoRAMoEFFN, LoRALinear)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_BLOCK_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def matches_target(name: str, targets: list[str]) -> bool:
    for t in targets:
        if t.startswith("re:"):
            if re.fullmatch(t[3:], name):
                return True
        elif name == t or name.endswith("." + t):
            return True
    return False


def block_index(name: str) -> int | None:
    m = _BLOCK_RE.search(name)
    return int(m.group(1)) if m else None


def inject_lora_moe(model: nn.Module, cfg: MoECfg, dispatch: str = "dense") -> list[str]:
    """Freeze ``model`` and wrap every targeted ``nn.Linear`` in a ``LoRAMoELinear`` (mode
    ``linear``), or every MLP in a ``LoRAMoEFFN`` plus a plain LoRA on the other targets (mode
    ``ffn``).

    Returns the wrapped module names. Raises if no module matches the targets.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.mode == "ffn":
        return _inject_ffn(model, cfg)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and matches_target(n, cfg.target_modules)]
    if not names:
        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                          if isinstance(m, nn.Linear)})
        raise ValueError(f"adapter.moe.target_modules={cfg.target_modules} matched no linear "
                         f"layer; this model's linear names are: {linears}")
    block_routers: dict[int, TopKRouter] = {}
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base: nn.Linear = getattr(parent, child)
        router, leader = None, True
        block = block_index(name)
        if cfg.router_scope == "block" and block is not None:
            leader = block not in block_routers
            if leader:
                block_routers[block] = TopKRouter(base.in_features, cfg.num_experts, cfg.top_k,
                                                  cfg.router_jitter)
            router = block_routers[block]
        # a per-module expert rank (Sensitivity-LoRA's map) keeps alpha / r: same update scale
        r = cfg.rank_pattern.get(name, cfg.r)
        layer = LoRAMoELinear(base, cfg.num_experts, cfg.top_k, r,
                              cfg.alpha * r / cfg.r, cfg.dropout,
                              router=router, router_leader=leader,
                              router_jitter=cfg.router_jitter, shared_expert=cfg.shared_expert,
                              dispatch=dispatch)
        layer.record_name = name
        if base.weight.device.type != "meta":
            layer.to(base.weight.device)
        setattr(parent, child, layer)
    # No ZeRO-3 leaf registration is needed, and it would be wrong here. Leaf modules exist
    # for MoE blocks whose experts are separate modules called only when they get tokens:
    # ranks that route differently then all-gather different parameters and hang. Our experts
    # are one stacked parameter per layer, and every rank calls every module in every forward
    # whatever the routing, so the gather sequence is identical on all ranks. Registering the
    # layer as a leaf also removes the router's own backward hook, and the router's gradient
    # from the auxiliary losses then meets released (empty) parameters.
    last_of_block: dict[int, LoRAMoELinear] = {}
    for name in names:
        layer = model.get_submodule(name)
        if not layer.owns_router:
            last_of_block[block_index(name)] = layer
    for layer in last_of_block.values():
        layer.ends_block = True  # clears the block router's hand-off (layer.py)
    return names


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _is_llama_mlp(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, p, None), nn.Linear)
               for p in ("gate_proj", "up_proj", "down_proj")) and hasattr(m, "act_fn")


def _inject_ffn(model: nn.Module, cfg: MoECfg) -> list[str]:
    """FFN-expert mode: every Llama-style MLP becomes a ``LoRAMoEFFN``; the targets outside the
    MLPs (by default q/k/v/o) get a plain ``LoRALinear``."""
    mlps = [n for n, m in model.named_modules() if _is_llama_mlp(m)]
    if not mlps:
        raise ValueError("adapter.moe.mode=ffn: no Llama-style MLP (gate_proj, up_proj, "
                         "down_proj, act_fn) found in this model")
    inside = tuple(n + "." for n in mlps)
    others = [n for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and matches_target(n, cfg.target_modules)
              and not n.startswith(inside)]
    for name in mlps:
        mlp = model.get_submodule(name)
        layer = LoRAMoEFFN(mlp, cfg.num_experts, cfg.top_k, cfg.r, cfg.alpha, cfg.dropout,
                           cfg.router_jitter)
        layer.record_name = name
        if mlp.gate_proj.weight.device.type != "meta":
            layer.to(mlp.gate_proj.weight.device)
        _set_child(model, name, layer)
    for name in others:
        base = model.get_submodule(name)
        lora = LoRALinear(base, cfg.r, cfg.alpha, cfg.dropout)
        if base.weight.device.type != "meta":
            lora.to(base.weight.device)
        _set_child(model, name, lora)
    return mlps + others


def moe_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The routed modules (``LoRAMoELinear`` or ``LoRAMoEFFN``), in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoEModule)]


def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def adapter_module_names(model: nn.Module) -> list[str]:
    """Every module an adapter file holds weights of, in model order."""
    return [n for n, m in model.named_modules() if isinstance(m, ADAPTER_MODULES)]


def routing_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The layers that make a routing decision (every layer, or one leader per block)."""
    return [(n, m) for n, m in moe_layers(model) if m.router_leader]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Expert and router weights by module name (queues excluded), as contiguous CPU tensors."""
    out = {}
    for name in adapter_module_names(model):
        for k, t in model.get_submodule(name).adapter_tensors().items():
            out[f"{name}.{k}"] = t.detach().to("cpu").contiguous()
    return out


def save_moe_adapter(model: nn.Module, out_dir: str | Path, cfg: MoECfg, base_model: str,
                     dispatch: str) -> None:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter_state_dict(model), out_dir / ADAPTER_WEIGHTS)
    meta = {"format": MOE_FORMAT, "version": 1, "base_model": base_model,
            "dispatch": dispatch, "moe": asdict(cfg),
            "modules": adapter_module_names(model)}
    fsio.write_json(out_dir / ADAPTER_CONFIG, meta)


def load_moe_adapter(model: nn.Module, adapter_dir: str | Path) -> MoECfg:
    """Inject LoRA-MoE layers as described by ``adapter_dir`` and load their weights exactly.

    Key sets must match exactly: a missing or extra tensor is an error, never a silent skip.
    """
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    cfg_path, w_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise ArtifactError(f"{p}: missing; not a sparsedoc LoRA-MoE adapter folder")
    adapter = read_adapter_meta(adapter_dir)
    if adapter.method != "lora_moe":
        raise ArtifactError(f"{cfg_path}: a peft {adapter.method} adapter, not a sparsedoc "
                            f"LoRA-MoE one (\"format\": \"{MOE_FORMAT}\")")
    meta = adapter.raw
    try:
        cfg = MoECfg(**adapter.moe)
        trained_on = list(meta["modules"])
    except (TypeError, KeyError, UserError) as e:
        raise ArtifactError(f"{cfg_path}: not the adapter_config.json sparsedoc writes ({e})") \
            from None
    inject_lora_moe(model, cfg, dispatch=meta.get("dispatch", "dense"))
    names = adapter_module_names(model)
    if names != trained_on:
        raise ArtifactError(f"{cfg_path}: adapter was trained on modules {trained_on[:3]}..., "
                            f"this model gives {names[:3]}...")
    try:
        weights = load_file(w_path)
    except Exception as e:  # safetensors raises its own error types on corrupt files
        raise ArtifactError(f"{w_path}: cannot read safetensors ({e}; truncated by an "
                            f"interrupted copy?)") from None
    expected = adapter_state_dict(model)
    missing, extra = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing and all(k.endswith(".router.shared_direction") for k in missing):
        # Adapters written before router calibration existed trained with no projection,
        # which is exactly a zero direction.
        weights.update({k: torch.zeros_like(expected[k]) for k in missing})
        missing = []
    if missing or extra:
        raise ArtifactError(f"{w_path}: key mismatch; missing {missing[:5]}, unexpected "
                            f"{extra[:5]}")
    params = dict(model.named_parameters()) | dict(model.named_buffers())
    with torch.no_grad():
        for k, v in weights.items():
            target = params[k]
            if target.shape != v.shape:
                raise ArtifactError(f"{w_path}: {k} has shape {tuple(v.shape)}, model expects "
                                    f"{tuple(target.shape)}")
            target.copy_(v.to(target.dtype))
    return cfg
