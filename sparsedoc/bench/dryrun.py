"""``sparsedoc bench --dry-run``: what each method would cost on a large model, with nothing loaded.

The model is built from its config on the meta device (no weights are read, downloaded or
allocated) and every method is applied to it exactly as training applies it, so the parameter
counts are those of the real run. FLOPs are read from the built modules' shapes; memory comes
from DeepSpeed's ZeRO estimators and from an explicit per-GPU breakdown that, unlike DeepSpeed's,
knows that a PEFT run trains only a small part of the model.

Conventions: FLOPs = 2 x multiply-adds, per token, forward only (training costs about 3x the
forward when every weight trains; with a frozen base about 2x the base forward, since the base
needs input gradients but no weight gradients). Memory is model states only (weights, gradients,
optimizer states), no activations, in GB of 2**30 bytes as DeepSpeed prints them.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

# Llama-3-8B and SmolLM2-135M, from their published config.json; "tiny" for tests.
PRESETS: dict[str, dict] = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                      rope_theta=500000.0, max_position_embeddings=8192,
                      tie_word_embeddings=False),
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                    rope_theta=100000.0, max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                 max_position_embeddings=256, tie_word_embeddings=False),
}
CLUSTERS = ((1, 8), (2, 8))  # (nodes, GPUs per node)
GiB = 2 ** 30


def llama_config(preset: str | dict):
    """A ``LlamaConfig`` from a preset name or from LlamaConfig keyword arguments."""
    from transformers import LlamaConfig

    if isinstance(preset, str):
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)} "
                             f"or a dict of LlamaConfig arguments")
        preset = PRESETS[preset]
    return LlamaConfig(**preset)


def variant_overrides(lora_r: int = 16, num_experts: int = 8, top_k: int = 2,
                      moe_r: int = 8) -> dict[str, list[str]]:
    """The config overrides of each variant, as ``sparsedoc train`` would be given them.

    ``model.name_or_path`` is set to a hub-like name so that no method resolves the default
    embedded model (that would convert a GGUF)."""
    model = ["model.name_or_path=dry-run", "model.dtype=bf16"]
    moe = [f"adapter.moe.num_experts={num_experts}", f"adapter.moe.top_k={top_k}",
           f"adapter.moe.r={moe_r}", "adapter.moe.dispatch=dense"]
    return {
        "lora": model + ["adapter.method=lora", f"adapter.lora.r={lora_r}"],
        "lora_moe": model + ["adapter.method=lora_moe", "adapter.moe.mode=linear"] + moe,
        "lora_moe_ffn": model + ["adapter.method=lora_moe", "adapter.moe.mode=ffn"] + moe,
        "full": model + ["adapter.method=full"],
    }


@contextmanager
def _quiet_sparsedoc_log():
    """The methods log a line per build; a dry run of four builds does not need them."""
    import logging

    log = logging.getLogger("sparsedoc")
    level = log.level
    log.setLevel(logging.WARNING)
    try:
        yield
    finally:
        log.setLevel(level)


def build_variant(config, overrides: list[str], device: str = "meta") -> nn.Module:
    """The base model of ``config`` with a method applied, as training applies it.

    On the meta device the whole build runs inside ``torch.device("meta")``, so the adapter
    tensors the methods create (``torch.empty`` + init, routers, memory queues) land on meta too:
    their inits are no-ops there and nothing is allocated."""
    from transformers import LlamaForCausalLM

    from sparsedoc.config import load_config
    from sparsedoc.methods import new_method

    cfg = load_config(None, overrides)
    with torch.device(device), _quiet_sparsedoc_log():
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        method = new_method(cfg.adapter.method)
        method.configure(cfg)
        return method.build(model, cfg)


# ---- FLOPs, from the modules' shapes -------------------------------------------------------------
def _linear_shape(m: nn.Module) -> tuple[int, int]:
    base = getattr(m, "base_layer", m)  # peft and sparsedoc wrappers keep the frozen linear here
    return base.in_features, base.out_features


def base_flops(model: nn.Module, seq_len: int) -> dict[str, int]:
    """Forward FLOPs per token of the frozen model: every linear (lm_head included), plus the
    attention scores and the weighted sum, QK^T and AV, at context ``seq_len`` (full context per
    token, not halved for the causal mask: the PaLM-paper convention, 4 * seq * d_attn a layer).
    """
    linear = attention = 0
    for m in model.modules():
        if type(m) is nn.Linear:
            linear += 2 * m.in_features * m.out_features
        elif type(m).__name__.endswith("Attention") and hasattr(m, "q_proj"):
            d_attn = _linear_shape(m.q_proj)[1]  # heads * head_dim
            attention += 2 * 2 * seq_len * d_attn
    return {"linear": linear, "attention": attention, "total": linear + attention}


def expert_flops(model: nn.Module) -> dict[str, int]:
    """Forward FLOPs per token of the adapter path of a built model.

    * peft LoRA and the FFN mode's attention LoRA: 2 r (in + out) per linear;
    * LoRA-MoE per linear: routed k experts, 2 k r (in + out), plus the router 2 in E (and a
      shared expert's 2 r (in + out)); ``dense`` is what the dense dispatch actually computes,
      all E experts, 2 E r (in + out) + router;
    * FFN mode: per MLP the router plus k experts' LoRA on gate, up and down. The frozen down
      projection runs once per token on the gate-mixed activation (``moe/ffn.py``), so the
      mode adds nothing to the base FLOPs (MixLoRA runs it on k rows per token: (k - 1) x
      2 in out more).
    """
    from peft.tuners.lora import LoraLayer

    from sparsedoc.moe.ffn import LoRALinear, LoRAMoEFFN
    from sparsedoc.moe.layer import LoRAMoELinear

    routed = dense = 0
    for m in model.modules():
        if isinstance(m, LoraLayer) and hasattr(m, "in_features"):
            f = sum(2 * r * (m.in_features + m.out_features) for r in m.r.values())
            routed, dense = routed + f, dense + f
        elif isinstance(m, LoRALinear):
            f = 2 * m.r * (m.in_features + m.out_features)
            routed, dense = routed + f, dense + f
        elif isinstance(m, LoRAMoELinear):
            per_expert = 2 * m.r * (m.in_features + m.out_features)
            shared = per_expert if m.shared_A is not None else 0
            router = 2 * m.in_features * m.num_experts if m.owns_router or m.router_leader else 0
            routed += m.top_k * per_expert + shared + router
            dense += m.num_experts * per_expert + shared + router
        elif isinstance(m, LoRAMoEFFN):
            h, i = m.hidden_size, m.intermediate_size
            per_expert = 3 * 2 * m.r * (h + i)  # gate, up, down
            router = 2 * h * m.num_experts
            routed += m.top_k * per_expert + router
            dense += m.num_experts * per_expert + router  # what a dense dispatch would cost
    return {"routed": routed, "dense": dense}


# ---- memory --------------------------------------------------------------------------------------
def largest_layer_params(model: nn.Module) -> int:
    """The most parameters one module holds directly: ZeRO-3 gathers a module at a time (what
    DeepSpeed's ``estimate_zero3_model_states_mem_needs_all_live`` measures the same way)."""
    return max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def zero_breakdown(total: int, trainable: int, gpus: int, stage: int,
                   largest_layer: int = 0) -> dict[str, int]:
    """Bytes per GPU of the model states of a bf16 run under ZeRO ``stage`` (2 or 3) on ``gpus``.

    With P_f = total - trainable frozen and P_t trainable parameters, N GPUs:

        frozen bf16 weights   2 P_f      (ZeRO-3: / N)
        trainable bf16 weights 2 P_t     (ZeRO-3: / N)
        bf16 gradients        2 P_t / N  (reduce-scattered: partitioned under ZeRO-2 and 3)
        fp32 gradients        4 P_t / N  (the partition the optimizer steps on)
        fp32 master weights   4 P_t / N
        Adam m and v          8 P_t / N
        ZeRO-3 only: the gathered working copy of the largest layer, 4 x its parameters

    Frozen weights have no gradients or optimizer states: that is what DeepSpeed's estimators
    (which assume every parameter trains) do not know. With P_t = P this is DeepSpeed's ZeRO-2
    figure exactly, 2 P + 18 P / N; DeepSpeed's ZeRO-3 figure is 18 P / N + 4 x largest layer,
    2 P / N below this one (its 18 bytes include the partitioned 16-bit weights, so it leaves
    out one of the gradient copies its own ZeRO-2 comment counts).
    """
    frozen = total - trainable
    weights_div = gpus if stage == 3 else 1
    out = {
        "frozen_bf16_weights": 2 * frozen // weights_div,
        "trainable_bf16_weights": 2 * trainable // weights_div,
        "bf16_grads": 2 * trainable // gpus,
        "fp32_grads": 4 * trainable // gpus,
        "fp32_master": 4 * trainable // gpus,
        "adam_m_v": 8 * trainable // gpus,
    }
    if stage == 3:
        out["gathered_layer"] = 4 * largest_layer
    out["total"] = sum(out.values())
    return out


def deepspeed_estimates(params: int, nodes: int, gpus_per_node: int,
                        largest_layer: int) -> dict[str, int]:
    """DeepSpeed's own GPU-bytes estimates (no offload) for ``params`` trained parameters."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    _, z2 = estimate_zero2_model_states_mem_needs(params, num_gpus_per_node=gpus_per_node,
                                                  num_nodes=nodes, cpu_offload=False)
    _, z3, _ = estimate_zero3_model_states_mem_needs(params, largest_layer,
                                                     num_gpus_per_node=gpus_per_node,
                                                     num_nodes=nodes, cpu_offload=False,
                                                     cpu_offload_params=False)
    return {"zero2": z2, "zero3": z3}


def memory(total: int, trainable: int, largest_layer: int, clusters=CLUSTERS,
           gpu_gb: float = 80) -> dict[str, dict]:
    """Per cluster shape ``"{nodes}x{gpus}"``, per ZeRO stage: our breakdown (GB), whether it fits
    ``gpu_gb``, and DeepSpeed's estimates fed with the trainable count (the optimizer-side states
    only) and with the total (as if every weight trained)."""
    out = {}
    for nodes, per_node in clusters:
        n = nodes * per_node
        ds_trainable = deepspeed_estimates(trainable, nodes, per_node, largest_layer)
        ds_total = deepspeed_estimates(total, nodes, per_node, largest_layer)
        shape = {}
        for stage in (2, 3):
            b = zero_breakdown(total, trainable, n, stage, largest_layer)
            key = f"zero{stage}"
            shape[key] = {"breakdown_gb": {k: v / GiB for k, v in b.items()},
                          "gb": b["total"] / GiB, "fits": b["total"] <= gpu_gb * GiB,
                          "deepspeed_trainable_gb": ds_trainable[key] / GiB,
                          "deepspeed_all_trained_gb": ds_total[key] / GiB}
        out[f"{nodes}x{per_node}"] = shape
    return out


# ---- the dry run ---------------------------------------------------------------------------------
def dry_run(preset: str | dict = "llama3-8b", *, lora_r: int = 16, num_experts: int = 8,
            top_k: int = 2, moe_r: int = 8, seq_len: int = 2048, clusters=CLUSTERS,
            gpu_gb: float = 80, variants: list[str] | None = None) -> dict:
    """Parameter counts, forward FLOPs per token and ZeRO memory per GPU of every variant on the
    model ``preset`` (a name in ``PRESETS`` or LlamaConfig arguments), built on meta.

    Returns a JSON-serialisable dict: ``model`` (its config), ``base`` (frozen FLOPs), and
    ``variants`` (one dict per variant: overrides, counts, FLOPs, ratio, memory).
    """
    from sparsedoc.methods.base import count_parameters

    config = llama_config(preset)
    base_model = build_variant(config, ["model.name_or_path=dry-run", "adapter.method=full"])
    base = base_flops(base_model, seq_len)
    largest = largest_layer_params(base_model)
    del base_model
    rows = []
    for name, overrides in variant_overrides(lora_r, num_experts, top_k, moe_r).items():
        if variants is not None and name not in variants:
            continue
        model = build_variant(config, overrides)
        trainable, total = count_parameters(model)
        flops = expert_flops(model)
        rows.append({
            "name": name, "overrides": overrides, "trainable": trainable, "total": total,
            "trainable_pct": 100 * trainable / total,
            "expert_flops": flops["routed"], "expert_flops_dense": flops["dense"],
            "ratio": flops["routed"] / base["total"],
            "ratio_dense": flops["dense"] / base["total"],
            "memory": memory(total, trainable, largest, clusters, gpu_gb),
        })
        del model
    return {"model": {"preset": preset if isinstance(preset, str) else "custom",
                      "config": {k: getattr(config, k) for k in PRESETS["tiny"]}},
            "seq_len": seq_len, "largest_layer_params": largest, "gpu_gb": gpu_gb,
            "flops_convention": "2 x multiply-adds per token, forward; training ~3x forward",
            "base": base, "variants": rows}


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_dry_run(result: dict) -> str:
    """A markdown table of a ``dry_run`` result: one row per variant."""
    base = result["base"]
    shapes = list(result["variants"][0]["memory"]) if result["variants"] else []
    head = ["variant", "trainable", "total", "trainable %", "expert FLOPs/tok",
            "(dense)", "expert/base", "(dense)"]
    head += [f"ZeRO-{s} GB {c}" for c in shapes for s in (2, 3)]
    lines = [f"**{result['model']['preset']}**: base forward {_si(base['total'])}FLOPs/token "
             f"(linears {_si(base['linear'])}, attention {_si(base['attention'])} at seq "
             f"{result['seq_len']}); {result['flops_convention']}; ZeRO: model states per GPU, "
             f"GB = 2^30 bytes, * = over {result['gpu_gb']:g} GB",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for v in result["variants"]:
        cells = [v["name"], f"{v['trainable']:,}", f"{v['total']:,}",
                 f"{v['trainable_pct']:.3f}", _si(v["expert_flops"]),
                 _si(v["expert_flops_dense"]), f"{v['ratio']:.2%}", f"{v['ratio_dense']:.2%}"]
        for c in shapes:
            for s in (2, 3):
                m = v["memory"][c][f"zero{s}"]
                cells.append(f"{m['gb']:.1f}" + ("" if m["fits"] else "*"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
