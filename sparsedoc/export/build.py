"""Turn a trained model (as ``sparsedoc.loader.load_trained`` returns it) into the model an export writes.

Each builder returns a stock-loadable model in fp32 on CPU, built on the meta device and filled
with ``load_state_dict(strict=True, assign=True)``: a key the target architecture does not expect,
or one it expects and we did not fill, is an error here rather than a silently re-initialised
weight in the exported folder.

* ``merged``: peft LoRA merged with peft's own ``merge_and_unload``; a full fine-tune as is.
* ``routed``: the LoRA-MoE as ``SparsedocMoEForCausalLM`` (sparsedoc.moe.hf); plain-LoRA parts
  (shared expert, FFN mode's attention LoRA) merged into their dense weights.
* ``mixtral``: an FFN-expert LoRA-MoE as ``MixtralForCausalLM``: expert e's w1/w3/w2 are the
  frozen gate/up/down plus that expert's LoRA delta, the router's effective weight is the gate.
* ``dense``: a plain Llama with ``W + sum_e mean_gate_e * s B_e A_e`` (gate means measured on
  calibration batches): an approximation, whose gap ``export`` measures and reports.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from sparsedoc.config import MoECfg
from sparsedoc.data.batch import model_inputs, real_tokens
from sparsedoc.errors import UserError
from sparsedoc.methods import method_class
from sparsedoc.methods.base import MethodError
from sparsedoc.moe.ffn import PROJ, LoRALinear, LoRAMoEFFN
from sparsedoc.moe.inject import block_index, moe_layers
from sparsedoc.moe.layer import LoRAMoELinear
from sparsedoc.moe.record import record_routing


class ExportError(UserError, RuntimeError):
    """An export cannot be made or did not verify; the message says which and why."""


def _training_state(key: str) -> bool:
    """Memory queues are training state: checkpointed, never exported."""
    return ".queue." in key or key.startswith("moe_label_queue.")


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights, fp32 on CPU. For an fp32 CPU model these *are* its tensors (no
    copy, an 8B model is not held twice), so builders only ever replace entries, never modify
    them in place: the trained model must stay intact as the verification's reference."""
    return {k: v.detach().float().cpu() for k, v in model.state_dict().items()
            if not _training_state(k)}


def _pop_prefix(sd: dict, prefix: str) -> None:
    for k in [k for k in sd if k.startswith(prefix)]:
        del sd[k]


def _merge_plain_lora(sd: dict, name: str, layer: LoRALinear) -> None:
    """``{name}.base_layer.*`` + LoRA -> ``{name}.weight`` / ``{name}.bias`` of a plain linear."""
    weight = sd.pop(f"{name}.base_layer.weight") + layer.delta_weight().float().cpu()
    bias = sd.pop(f"{name}.base_layer.bias", None)
    _pop_prefix(sd, name + ".")
    sd[f"{name}.weight"] = weight
    if bias is not None:
        sd[f"{name}.bias"] = bias


def _fill(cls, config, sd: dict[str, torch.Tensor]):
    """Instantiate ``cls(config)`` without allocating, then take ``sd`` as its weights."""
    with torch.device("meta"):
        model = cls(config)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as e:
        raise ExportError(f"building {cls.__name__}: weights do not match the architecture "
                          f"({str(e)[:600]})") from None
    model.tie_weights()
    # non-persistent buffers (rotary inv_freq) are not in any state dict: rebuild those modules
    for name, module in list(model.named_modules()):
        if type(module).__name__.endswith("RotaryEmbedding"):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    type(module)(config=module.config))
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers())
                if t.device.type == "meta"]
    if leftover:
        raise ExportError(f"building {cls.__name__}: tensors never filled: {leftover[:5]}")
    return model.eval()


# ---- merged (LoRA via peft, full fine-tune) ------------------------------------------------------
def build_merged(model: nn.Module, method: str) -> nn.Module:
    try:
        merged = method_class(method).merged(model)
    except MethodError as e:
        raise ExportError(str(e)) from None
    return merged.float().cpu().eval()


# ---- routed LoRA-MoE ------------------------------------------------------------------------------
def build_routed(model: nn.Module, cfg: MoECfg) -> nn.Module:
    from sparsedoc.moe.hf import SparsedocMoEConfig, SparsedocMoEForCausalLM

    sd = _base_state(model)
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            _merge_plain_lora(sd, name, m)
        elif isinstance(m, LoRAMoELinear) and m.shared_A is not None:
            key = f"{name}.base_layer.weight"
            sd[key] = sd[key] + m.shared_delta_weight().float().cpu()  # never in place
            del sd[f"{name}.shared_A"], sd[f"{name}.shared_B"]
    # what the exported model still routes; plain-LoRA parts are gone into the dense weights
    kept = replace(cfg, shared_expert=False, contrastive="none",
                   target_modules=[] if cfg.mode == "ffn" else cfg.target_modules)
    config = SparsedocMoEConfig(**(model.config.to_dict() | {
        "sparsedoc_moe": asdict(kept), "architectures": ["SparsedocMoEForCausalLM"]}))
    return _fill(SparsedocMoEForCausalLM, config, sd)


# ---- Mixtral ----------------------------------------------------------------------------------------
def mixtral_config(llama_config, cfg: MoECfg):
    from transformers import MixtralConfig

    lc = llama_config
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(lc, flag, False):
            raise ExportError(f"mode mixtral: the base model has {flag}=True; Mixtral layers "
                              f"have no biases")
    return MixtralConfig(
        vocab_size=lc.vocab_size, hidden_size=lc.hidden_size,
        intermediate_size=lc.intermediate_size, num_hidden_layers=lc.num_hidden_layers,
        num_attention_heads=lc.num_attention_heads, num_key_value_heads=lc.num_key_value_heads,
        head_dim=lc.head_dim, hidden_act=lc.hidden_act,
        max_position_embeddings=lc.max_position_embeddings, rms_norm_eps=lc.rms_norm_eps,
        tie_word_embeddings=lc.tie_word_embeddings, bos_token_id=lc.bos_token_id,
        eos_token_id=lc.eos_token_id, pad_token_id=lc.pad_token_id,
        rope_parameters=copy.deepcopy(lc.rope_parameters), sliding_window=None,
        attention_dropout=lc.attention_dropout, num_local_experts=cfg.num_experts,
        num_experts_per_tok=cfg.top_k, router_jitter_noise=0.0,
        architectures=["MixtralForCausalLM"])


def build_mixtral(model: nn.Module, cfg: MoECfg) -> nn.Module:
    from transformers import MixtralForCausalLM

    if cfg.mode != "ffn":
        raise ExportError("mode mixtral needs an FFN-expert LoRA-MoE (adapter.moe.mode=ffn): a "
                          "Mixtral expert is a whole FFN, while mode=linear routes every "
                          "projection on its own; use --mode routed (exact) or dense")
    if getattr(model.config, "model_type", "") not in ("llama", "sparsedoc_lora_moe"):
        raise ExportError(f"mode mixtral supports Llama-architecture bases; this one is "
                          f"{model.config.model_type}")
    sd = _base_state(model)
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            _merge_plain_lora(sd, name, m)
    ffns = dict(moe_layers(model))
    for name, m in ffns.items():
        experts = [m.expert_weights(e) for e in range(m.num_experts)]
        _pop_prefix(sd, name + ".")
        sd[f"{name}.gate.weight"] = m.router.effective_weight().detach().float().cpu()
        sd[f"{name}.experts.gate_up_proj"] = torch.stack(
            [torch.cat([w["gate"], w["up"]]) for w in experts]).float().cpu()
        sd[f"{name}.experts.down_proj"] = torch.stack([w["down"] for w in experts]).float().cpu()
    if len(ffns) != model.config.num_hidden_layers:
        raise ExportError(f"mode mixtral: {len(ffns)} MoE FFN blocks for "
                          f"{model.config.num_hidden_layers} layers; every layer needs one")
    return _fill(MixtralForCausalLM, mixtral_config(model.config, cfg), sd)


# ---- dense approximation ----------------------------------------------------------------------------
@torch.no_grad()
def measure_gate_means(model: nn.Module, batches: list[dict]) -> dict[str, torch.Tensor]:
    """Mean gate of every expert over the real tokens of ``batches``, per routed module."""
    layers = moe_layers(model)
    if not layers:
        raise ExportError("mode dense needs a LoRA-MoE model; no routed layer found")
    sums = {n: torch.zeros(m.num_experts, dtype=torch.float64) for n, m in layers}
    # the routing layer whose decision each module applies (itself, or its block's leader)
    leaders = {block_index(n): n for n, m in layers if m.router_leader and not m.owns_router}
    router_of = {n: n if m.router_leader else leaders[block_index(n)] for n, m in layers}
    tokens = 0.0
    dev = next(model.parameters()).device
    for batch in tqdm(batches, desc="gate means", leave=False):
        batch = {k: v.to(dev) if torch.is_tensor(v) else v for k, v in batch.items()}
        with record_routing() as record:
            model(**model_inputs(batch))
        mask = real_tokens(batch).reshape(-1, 1).double()  # filler rows of eval batches: 0
        for n, _ in layers:
            sums[n] += (record.routing[router_of[n]].dense_gates().double() * mask).sum(0).cpu()
        tokens += float(mask.sum())
    if tokens == 0:
        raise ExportError("mode dense: the calibration batches hold no tokens")
    return {n: (s / tokens).float() for n, s in sums.items()}


def build_dense(model: nn.Module, gate_means: dict[str, torch.Tensor]) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    sd = _base_state(model)
    for name, m in model.named_modules():
        if isinstance(m, LoRALinear):
            _merge_plain_lora(sd, name, m)
        elif isinstance(m, LoRAMoELinear):
            g = gate_means[name]
            w = sd[f"{name}.base_layer.weight"] + sum(
                float(g[e]) * m.delta_weight(e).float().cpu() for e in range(m.num_experts))
            if m.shared_A is not None:
                w = w + m.shared_delta_weight().float().cpu()
            bias = sd.get(f"{name}.base_layer.bias")
            _pop_prefix(sd, name + ".")
            sd[f"{name}.weight"] = w
            if bias is not None:
                sd[f"{name}.bias"] = bias
        elif isinstance(m, LoRAMoEFFN):
            g = gate_means[name]
            merged = {p: sd[f"{name}.base_mlp.{p}_proj.weight"] + sum(
                float(g[e]) * m.delta_weight(p, e).float().cpu() for e in range(m.num_experts))
                for p in PROJ}
            _pop_prefix(sd, name + ".")
            for p, w in merged.items():
                sd[f"{name}.{p}_proj.weight"] = w
    config = LlamaConfig(**{k: v for k, v in model.config.to_dict().items()
                            if k not in ("model_type", "sparsedoc_moe")})
    config.architectures = ["LlamaForCausalLM"]
    return _fill(LlamaForCausalLM, config, sd)
