"""Greedy KV-cache decoding speed of each inference form of a model, side by side.

Variants (``VARIANTS``), all built on the same frozen base with random (seeded) adapter weights,
since speed does not depend on what the adapters learned:

* ``base``: the model as loaded;
* ``lora_merged``: a peft LoRA (r=16, the LoRA-MoE's targets) merged with ``merge_and_unload``,
  so a plain model again: the floor a single LoRA reaches at inference;
* ``lora_moe``: the training-time LoRA-MoE (E=8, top-2, r=8 on every targeted linear);
* ``routed``: the same LoRA-MoE exported as ``SparsedocMoEForCausalLM`` and reloaded from disk;
* ``ffn``: FFN-expert mode (MixLoRA-style, E=8, top-2, r=8).

Rounds interleave the variants (their order rotated each round) so the noise of a shared machine
hits all of them alike; one warm-up generation per variant and batch size is not timed.
"""

from __future__ import annotations

import gc
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

VARIANTS = ("base", "lora_merged", "lora_moe", "routed", "ffn")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomise_adapters(model: nn.Module, seed: int = 0, scale: float = 0.05) -> None:
    """Non-zero LoRA B (zero at init) and a unit router direction, so experts differ and a
    routed or merged path does real work; seeded, so every variant gets the same draw."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "shared_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
        for n, b in model.named_buffers():
            if n.endswith("shared_direction"):
                b.copy_(nn.functional.normalize(torch.randn(b.shape, generator=g), dim=0))


def moe_overrides(model_dir: str, mode: str = "linear", num_experts: int = 8, top_k: int = 2,
                  r: int = 8, router_scope: str = "module") -> list[str]:
    """Config overrides of a LoRA-MoE without dropout (inference) over ``TARGETS``."""
    return [f"model.name_or_path={model_dir}", "adapter.method=lora_moe",
            f"adapter.moe.mode={mode}", f"adapter.moe.num_experts={num_experts}",
            f"adapter.moe.top_k={top_k}", f"adapter.moe.r={r}", "adapter.moe.dropout=0",
            f"adapter.moe.router_scope={router_scope}"]


def _load_base(model_dir: str, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()


def build_moe(model_dir: str, overrides: list[str] | None = None, seed: int = 0,
              dtype: torch.dtype = torch.float32, **moe_kw) -> nn.Module:
    """The training-time LoRA-MoE through the method's own ``build`` (what training runs)."""
    from sparsedoc.config import load_config
    from sparsedoc.methods import new_method

    cfg = load_config(None, moe_overrides(model_dir, **moe_kw) + list(overrides or []))
    model = new_method(cfg.adapter.method).build(_load_base(model_dir, dtype), cfg)
    model.sparsedoc_moe_cfg = cfg.adapter.moe  # what build_routed needs to export it
    randomise_adapters(model, seed)
    return model.eval()


def export_routed(moe_model: nn.Module, out_dir: str | Path, tokenizer_dir: str | None = None
                  ) -> nn.Module:
    """Write ``moe_model`` as a routed export and load it back the way users do."""
    import sparsedoc
    from sparsedoc.export.build import build_routed

    routed = build_routed(moe_model, moe_model.sparsedoc_moe_cfg)
    routed.save_pretrained(out_dir, safe_serialization=True)
    del routed
    return sparsedoc.load_pretrained(str(out_dir), dtype=moe_model.dtype).eval()


def build_merged_lora(model_dir: str, r: int = 16, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> nn.Module:
    """A peft LoRA on ``TARGETS`` merged into the weights: a plain model again."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(_load_base(model_dir, dtype),
                                LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS,
                                           lora_dropout=0.0))
    randomise_adapters(peft_model, seed)
    return peft_model.merge_and_unload().eval()


def build_variant(name: str, model_dir: str, work_dir: Path, seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> nn.Module:
    """One of ``VARIANTS`` on the base at ``model_dir`` (``work_dir``: the routed export)."""
    if name == "base":
        return _load_base(model_dir, dtype)
    if name == "lora_merged":
        return build_merged_lora(model_dir, seed=seed, dtype=dtype)
    if name == "lora_moe":
        return build_moe(model_dir, seed=seed, dtype=dtype)
    if name == "ffn":
        return build_moe(model_dir, seed=seed, dtype=dtype, mode="ffn")
    if name == "routed":
        moe = build_moe(model_dir, seed=seed, dtype=dtype)
        routed = export_routed(moe, work_dir / "routed")
        del moe
        return routed
    raise ValueError(f"unknown generation variant {name!r}; expected one of {VARIANTS}")


def _prompts(vocab_size: int, batch: int, prompt_len: int, seed: int) -> dict[str, torch.Tensor]:
    """Random token prompts of one length (no padding: every row does the same work)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (batch, prompt_len), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@torch.inference_mode()
def _generate_seconds(model: nn.Module, inputs: dict, new_tokens: int) -> float:
    # min_new_tokens: an early EOS would make one variant do less work than another
    t0 = time.perf_counter()
    out = model.generate(**inputs, do_sample=False, use_cache=True, max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, pad_token_id=0)
    seconds = time.perf_counter() - t0
    assert out.shape[1] == inputs["input_ids"].shape[1] + new_tokens
    return seconds


def measure_generation(model_dir: str, variants: tuple[str, ...] = VARIANTS,
                       batch_sizes: tuple[int, ...] = (1, 8), new_tokens: int = 32,
                       prompt_len: int = 32, rounds: int = 3, seed: int = 0,
                       dtype: torch.dtype = torch.float32) -> dict:
    """Time greedy KV-cache generation of every variant at every batch size.

    Args:
        model_dir: an HF folder (or anything ``from_pretrained`` loads) of a Llama-style model.
        variants: names from ``VARIANTS``; ``base`` is needed for the ratios.
        batch_sizes, new_tokens, prompt_len: the workload; tokens/s counts generated tokens
            (``batch * new_tokens``) over the wall time of ``generate`` (its one prefill included).
        rounds: timed repeats, interleaved over variants; the reported figure is their median.

    Returns:
        JSON-serialisable ``{"settings": ..., "rows": [...]}``; each row has ``variant``,
        ``batch``, ``tok_s`` (median), ``tok_s_min``, ``tok_s_max``, ``seconds`` (per round) and
        ``vs_base`` (median tok/s over the base's at that batch size, None without a base).
    """
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or rounds < 1 or new_tokens < 1 or prompt_len < 1:
        raise ValueError(f"measure_generation: variants {unknown} not in {VARIANTS}, or rounds "
                         f"/ new_tokens / prompt_len < 1 ({rounds} / {new_tokens} / {prompt_len})")
    with tempfile.TemporaryDirectory(prefix="sparsedoc-bench-gen-") as tmp:
        models = {v: build_variant(v, model_dir, Path(tmp), seed=seed, dtype=dtype)
                  for v in variants}
        vocab = next(iter(models.values())).config.vocab_size
        seconds: dict[tuple[str, int], list[float]] = {(v, b): [] for v in variants
                                                       for b in batch_sizes}
        for b in batch_sizes:
            inputs = _prompts(vocab, b, prompt_len, seed)
            for v in variants:  # warm-up: allocator, kernels, generation config caches
                _generate_seconds(models[v], inputs, min(4, new_tokens))
            for rnd in range(rounds):
                order = variants[rnd % len(variants):] + variants[:rnd % len(variants)]
                for v in order:
                    seconds[(v, b)].append(_generate_seconds(models[v], inputs, new_tokens))
        del models
        gc.collect()
    rows = []
    for b in batch_sizes:
        base = statistics.median(b * new_tokens / s for s in seconds[("base", b)]) \
            if "base" in variants else None
        for v in variants:
            tok_s = [b * new_tokens / s for s in seconds[(v, b)]]
            med = statistics.median(tok_s)
            rows.append({"variant": v, "batch": b, "tok_s": med, "tok_s_min": min(tok_s),
                         "tok_s_max": max(tok_s), "seconds": seconds[(v, b)],
                         "vs_base": med / base if base else None})
    settings = {"model": str(model_dir), "variants": list(variants),
                "batch_sizes": list(batch_sizes), "new_tokens": new_tokens,
                "prompt_len": prompt_len, "rounds": rounds, "seed": seed, "dtype": str(dtype),
                "device": "cpu", "torch_threads": torch.get_num_threads(),
                "torch": torch.__version__, "machine": platform.machine()}
    return {"settings": settings, "rows": rows}


def format_generation(result: dict) -> str:
    """A markdown table of ``measure_generation``'s result, one line per variant and batch."""
    s = result["settings"]
    lines = [f"greedy KV-cache generation, {s['new_tokens']} new tokens after {s['prompt_len']}"
             f", median of {s['rounds']} rounds ({s['dtype']}, {s['torch_threads']} threads)", "",
             "| variant | batch | tok/s | min | max | vs base |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        ratio = "" if r["vs_base"] is None else f"{r['vs_base']:.2f}x"
        lines.append(f"| {r['variant']} | {r['batch']} | {r['tok_s']:.1f} | {r['tok_s_min']:.1f} "
                     f"| {r['tok_s_max']:.1f} | {ratio} |")
    return "\n".join(lines)
