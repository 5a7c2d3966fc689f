"""Training-step time and peak memory of every variant, on the same model and batch, in one run.

Each variant is built and timed in its own process (no allocator or cache state carried from one
to the next), the variants interleave over rounds in a rotating order (a noisy stretch of a shared
machine hits all of them alike), and warm-up steps are excluded. What to read are the ratios:

* to peft LoRA of rank ``lora_r`` on the same modules (what a user would otherwise train), and to
  peft LoRA at the MoE's expert parameter count (rank E x r);
* to the floor: the frozen base's forward+backward (activation gradients only), which no adapter
  can beat.

Peak memory is CUDA's max allocated on a GPU and the process's peak RSS on CPU, both reset after
the model is built, so they cover the steps (weights, activations, gradients, optimizer states).
On CPU it comes from a run of its own with glibc's mmap threshold at 1 MiB: by default freed
heap blocks stay mapped, and the RSS then measures how the allocator happened to reuse them
(it put LoRA-MoE's FFN mode 1.3 GB above its live tensors) rather than what was alive. The
timed runs keep the default allocator.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
FFN_PROJECTIONS = ["gate_proj", "up_proj", "down_proj"]

# preset -> (model, batch, seq): ``tiny`` is a random 2-layer Llama built in code (seconds, CI).
PRESETS = {
    "tiny": ("tiny", 2, 64),
    "smollm2": ("embedded", 4, 256),
}
TINY_LLAMA = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                  max_position_embeddings=256, tie_word_embeddings=True)


@dataclass(frozen=True)
class Variant:
    """How to build one row: a sparsedoc method (config overrides) or a peer."""

    label: str
    kind: str  # "sparsedoc" | "floor" | "mixlora" | "xlora"
    overrides: tuple[str, ...] = ()


def variants(experts: int, top_k: int, r: int, lora_r: int) -> dict[str, Variant]:
    """Every row of the table, for E experts of rank r (top-k) against LoRA of rank lora_r."""
    targets = "adapter.lora.target_modules=[" + ",".join(PROJECTIONS) + "]"
    moe_targets = "adapter.moe.target_modules=[" + ",".join(PROJECTIONS) + "]"
    lora = ("adapter.method=lora", targets, "adapter.lora.dropout=0")
    moe = ("adapter.method=lora_moe", moe_targets, f"adapter.moe.num_experts={experts}",
           f"adapter.moe.top_k={top_k}", f"adapter.moe.r={r}", f"adapter.moe.alpha={2 * r}",
           "adapter.moe.dropout=0", "adapter.moe.contrastive=label")
    return {
        "floor": Variant("frozen base forward+backward (floor)", "floor"),
        "lora": Variant(f"peft LoRA r{lora_r}", "sparsedoc",
                        lora + (f"adapter.lora.r={lora_r}", f"adapter.lora.alpha={2 * lora_r}")),
        "lora_matched": Variant(f"peft LoRA r{experts * r} (the MoE's expert parameters)",
                                "sparsedoc", lora + (f"adapter.lora.r={experts * r}",
                                                     f"adapter.lora.alpha={2 * experts * r}")),
        "full": Variant("full fine-tune", "sparsedoc", ("adapter.method=full",)),
        "moe_dense": Variant("LoRA-MoE per linear, dense dispatch", "sparsedoc",
                             moe + ("adapter.moe.dispatch=dense",)),
        "moe_grouped": Variant("LoRA-MoE per linear, grouped dispatch", "sparsedoc",
                               moe + ("adapter.moe.dispatch=grouped",)),
        "moe_all_experts": Variant(f"LoRA-MoE dense all-experts (top_k={experts})", "sparsedoc",
                                   moe + ("adapter.moe.dispatch=dense",
                                          f"adapter.moe.top_k={experts}")),
        "moe_ffn": Variant("LoRA-MoE FFN experts (mode=ffn)", "sparsedoc",
                           moe + ("adapter.moe.mode=ffn",)),
        "mixlora": Variant("MixLoRA 0.2.3 (FFN experts, same E, k, r)", "mixlora"),
        "xlora": Variant(f"peft X-LoRA ({experts} LoRA r{r})", "xlora"),
    }


@dataclass
class StepSpec:
    """What one child process measures (JSON on its command line)."""

    variant: str
    model: str = "tiny"
    batch: int = 2
    seq: int = 64
    experts: int = 8
    top_k: int = 2
    r: int = 8
    lora_r: int = 16
    steps: int = 3
    warmup: int = 1
    dtype: str = "auto"  # auto: bf16 on CUDA, fp32 on CPU
    grad_ckpt: bool = False
    seed: int = 0
    extra: list[str] = field(default_factory=list)  # more config overrides for sparsedoc rows


# ---- memory -------------------------------------------------------------------------------------
def _rss_peak_reset() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux; a no-op where unsupported)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _rss_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    else:
        _rss_peak_reset()


def _peak_bytes() -> int:
    return torch.cuda.max_memory_allocated() if torch.cuda.is_available() else _rss_peak_bytes()


# ---- building one variant -----------------------------------------------------------------------
def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_base(model: str, dtype: torch.dtype, seed: int):
    """The frozen base: the tiny random Llama, or any model path / ``embedded``."""
    if model == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(**TINY_LLAMA)).to(dtype)
    from sparsedoc.config import ModelCfg
    from sparsedoc.models.load import load_model_and_tokenizer

    return load_model_and_tokenizer(ModelCfg(name_or_path=model), dtype=dtype)[0]


def _freeze(model) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


def build_mixlora(model, experts: int, top_k: int, r: int, seed: int):
    """MixLoRA 0.2.3: routed LoRA experts in every FFN, a plain LoRA on the attention projections
    (as sparsedoc's FFN mode, so the trainable counts are equal). Its router is a plain tensor and
    its experts sit in a dict, so both are registered here as parameters / modules to train."""
    import math

    from mixlora import MixLoraConfig, inject_adapter_in_model
    from torch import nn

    _freeze(model)
    config = MixLoraConfig.from_config({
        "peft_type": "MIXLORA", "task_type": "CAUSAL_LM", "bias": "none",
        "base_model_name_or_path": "bench", "r": r, "lora_alpha": 2 * r,
        "lora_dropout": 0.05,  # MixLoRA asserts > 0; replaced by identity below, as elsewhere
        "target_modules": PROJECTIONS, "routing_strategy": "mixlora",
        "num_experts": experts, "top_k": top_k, "act_fn": model.config.hidden_act})
    config.adapter_name_ = "default"
    config.dtype_ = next(model.parameters()).dtype
    config.check()
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for i, layer in enumerate(model.model.layers):
        hidden = layer.mlp.gate_proj.in_features
        weights[f"mixlora.layers.{i}.mlp.moe_gate.weight"] = (
            torch.randn(experts, hidden, generator=g) * 0.02).to(config.dtype_)
        for name in FFN_PROJECTIONS:
            lin = getattr(layer.mlp, name)
            for e in range(experts):
                key = f"mixlora.layers.{i}.mlp.{name}.experts.{e}"
                a = torch.empty(r, lin.in_features)
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                weights[f"{key}.lora_A.weight"] = a.to(config.dtype_)
                weights[f"{key}.lora_B.weight"] = torch.zeros(lin.out_features, r,
                                                              dtype=config.dtype_)
        for name in PROJECTIONS[:4]:
            lin = getattr(layer.self_attn, name)
            a = torch.empty(r, lin.in_features)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            key = f"mixlora.layers.{i}.self_attn.{name}"
            weights[f"{key}.lora_A.weight"] = a.to(config.dtype_)
            weights[f"{key}.lora_B.weight"] = torch.zeros(lin.out_features, r, dtype=config.dtype_)
    inject_adapter_in_model(model, config, weights)
    from mixlora.lora_linear import LoraLinear

    for module in model.modules():
        if isinstance(module, LoraLinear):
            module.dropout_ = nn.Identity()
    for layer in model.model.layers:
        moe = layer.mlp.mixlora_moes["default"]
        layer.mlp.mixlora_gate = nn.Parameter(moe.gate_.clone())
        moe.gate_ = layer.mlp.mixlora_gate  # the forward reads it through .to(): same tensor
        layer.mlp.mixlora_experts = nn.ModuleDict(
            {k.replace(".", "_"): v for k, v in moe.experts_.items()})
        for expert in moe.experts_.values():
            expert.dropout_ = nn.Identity()
            expert.lora_A.weight.requires_grad_(True)
            expert.lora_B.weight.requires_grad_(True)
    return model


def build_xlora(model, experts: int, r: int, seed: int, workdir: str):
    """peft X-LoRA over ``experts`` LoRA adapters of rank r (saved once, as X-LoRA loads them
    from disk), its classifier trained and the adapters frozen, as X-LoRA trains."""
    from peft import LoraConfig, XLoraConfig, get_peft_model

    _freeze(model)
    paths = {}
    for e in range(experts):
        torch.manual_seed(seed + e)
        lora = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0,
                                                target_modules=PROJECTIONS, init_lora_weights=False))
        path = f"{workdir}/adapter_{e}"
        lora.save_pretrained(path)
        model = lora.unload()
        paths[str(e)] = path
    model.config.use_cache = False  # X-LoRA refuses a model that caches
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size,
                      adapters=paths, xlora_depth=1, top_k_lora=None)
    return get_peft_model(model, cfg)


def _batch(spec: StepSpec, vocab: int, dev: torch.device) -> dict[str, torch.Tensor]:
    """Random ids (seeded), one record per row, four labels for the label contrast."""
    g = torch.Generator().manual_seed(spec.seed)
    ids = torch.randint(0, vocab, (spec.batch, spec.seq), generator=g).to(dev)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
            "record_ids": torch.arange(spec.batch, device=dev)[:, None].expand_as(ids).clone(),
            "record_label_ids": torch.arange(spec.batch, device=dev) % 4}


def measure(spec: StepSpec) -> dict:
    """Child process: build one variant, time ``steps`` optimizer steps on one fixed batch."""
    import tempfile

    from sparsedoc.methods.base import count_parameters

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _dtype(spec.dtype)
    row = variants(spec.experts, spec.top_k, spec.r, spec.lora_r)[spec.variant]
    model = load_base(spec.model, dtype, spec.seed)
    method = None
    with tempfile.TemporaryDirectory() as tmp:
        if row.kind == "sparsedoc":
            from sparsedoc.config import load_config
            from sparsedoc.methods import new_method

            cfg = load_config(None, [f"model.name_or_path={spec.model}", *row.overrides,
                                     *spec.extra])
            method = new_method(cfg.adapter.method)
            method.configure(cfg)
            model = method.build(model, cfg)
        elif row.kind == "floor":
            _freeze(model)
        elif row.kind == "mixlora":
            model = build_mixlora(model, spec.experts, spec.top_k, spec.r, spec.seed)
        elif row.kind == "xlora":
            model = build_xlora(model, spec.experts, spec.r, spec.seed, tmp)
        else:
            raise ValueError(f"unknown variant kind {row.kind!r}")
    model = model.to(dev)
    model.train()
    if spec.grad_ckpt:
        from sparsedoc.models.load import enable_activation_checkpointing

        enable_activation_checkpointing(model)
    trainable, total = count_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    if not params:  # the floor: activation gradients through every layer, no weight gradient
        model.get_input_embeddings().register_forward_hook(
            lambda m, i, out: out.requires_grad_(True))
    batch = _batch(spec, model.config.vocab_size, dev)
    model_batch = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

    _reset_peak()
    times = []
    for step in range(spec.warmup + spec.steps):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        if method is not None:
            loss, _ = method.compute_loss(model, batch, step)
        else:
            loss = model(**model_batch).loss
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        if method is not None:
            method.after_optimizer_step(model, step + 1)
        if dev.type == "cuda":
            torch.cuda.synchronize()  # time the work, not its launch
        if step >= spec.warmup:
            times.append(time.perf_counter() - t0)
    return {"variant": spec.variant, "times_s": times, "peak_bytes": _peak_bytes(),
            "trainable": trainable, "total": total, "device": dev.type, "dtype": str(dtype)}


# ---- the parent: rounds of child processes ------------------------------------------------------
def run_child(spec: StepSpec, env: dict[str, str] | None = None) -> dict:
    proc = subprocess.run([sys.executable, "-m", "sparsedoc.bench.step", json.dumps(asdict(spec))],
                          capture_output=True, text=True,
                          env={**os.environ, **env} if env else None)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"bench variant {spec.variant!r} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT "):])


# glibc: allocations above 1 MiB are mmap'd and unmapped when freed, so RSS follows live memory
LIVE_RSS_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 20)}


def _summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def run_steps(spec: StepSpec, names: list[str], rounds: int, progress=None) -> dict:
    """Every variant in ``names``, ``rounds`` times, interleaved; summaries and ratios."""
    samples: dict[str, list[dict]] = {n: [] for n in names}
    for i in range(rounds):
        order = names[i % len(names):] + names[:i % len(names)]  # rotate: no fixed neighbour
        for name in order:
            samples[name].append(run_child(StepSpec(**{**asdict(spec), "variant": name})))
            if progress:
                progress(name)
    peaks = {n: [r["peak_bytes"] for r in runs] for n, runs in samples.items()}
    if not torch.cuda.is_available():  # live memory, one run each (see the module docstring)
        for name in names:
            mem = run_child(StepSpec(**{**asdict(spec), "variant": name, "steps": 1,
                                        "warmup": 1}), env=LIVE_RSS_ENV)
            peaks[name] = [mem["peak_bytes"]]
            if progress:
                progress(name + " (memory)")
    table = variants(spec.experts, spec.top_k, spec.r, spec.lora_r)
    rows = {}
    for name, runs in samples.items():
        times = [t for r in runs for t in r["times_s"]]
        step = _summary(times)
        rows[name] = {"label": table[name].label, "step_s": step,
                      "peak_mib": _summary([b / 2**20 for b in peaks[name]]),
                      "tokens_per_s": spec.batch * spec.seq / step["median"],
                      "trainable": runs[0]["trainable"], "total": runs[0]["total"],
                      "trainable_pct": 100 * runs[0]["trainable"] / runs[0]["total"]}
    for name, row in rows.items():
        for ref in ("lora", "lora_matched", "floor"):
            if ref in rows:
                row[f"step_x_{ref}"] = row["step_s"]["median"] / rows[ref]["step_s"]["median"]
                row[f"mem_x_{ref}"] = row["peak_mib"]["median"] / rows[ref]["peak_mib"]["median"]
    first = next(iter(samples.values()))[0]
    return {"spec": {k: v for k, v in asdict(spec).items() if k != "variant"},
            "rounds": rounds, "device": first["device"], "dtype": first["dtype"],
            "memory": ("CUDA max allocated" if torch.cuda.is_available() else
                       "peak RSS of a run of its own, glibc mmap threshold 1 MiB"),
            "rows": rows}


# Ratios the issue set (per-linear MoE vs LoRA, FFN mode vs MixLoRA, dense vs sparse).
TARGETS = [
    ("LoRA-MoE per linear step <= 1.10 x peft LoRA", "moe_dense", "step_x", "lora", 1.10, "<="),
    ("LoRA-MoE per linear peak memory <= 1.15 x peft LoRA", "moe_dense", "mem_x", "lora", 1.15,
     "<="),
    ("FFN mode step <= 0.70 x MixLoRA", "moe_ffn", "step_x", "mixlora", 0.70, "<="),
    ("FFN mode peak memory <= MixLoRA's", "moe_ffn", "mem_x", "mixlora", 1.00, "<="),
    ("dense all-experts >= 1.5 x the sparse path's step", "moe_all_experts", "step_x",
     "moe_dense", 1.5, ">="),
]


def check_targets(result: dict) -> list[dict]:
    """Each target with its measured ratio (None when a row is missing) and whether it holds."""
    rows = result["rows"]
    out = []
    for text, row, kind, ref, bound, op in TARGETS:
        ratio = None
        if row in rows and ref in rows:
            key = "step_s" if kind == "step_x" else "peak_mib"
            ratio = rows[row][key]["median"] / rows[ref][key]["median"]
        met = None if ratio is None else (ratio <= bound if op == "<=" else ratio >= bound)
        out.append({"target": text, "ratio": ratio, "met": met})
    return out


def format_steps(result: dict) -> str:
    """The markdown table the README shows, then the targets."""
    s = result["spec"]
    lines = [f"Training step, {s['model']}, batch {s['batch']} x {s['seq']}, {result['dtype']} on "
             f"{result['device']}, E={s['experts']} top-{s['top_k']} r={s['r']}; median "
             f"[min-max] over {result['rounds']} rounds x {s['steps']} steps, warm-up excluded; "
             f"peak memory: {result['memory']}.",
             "",
             "| variant | trainable | % | s/step | tokens/s | x LoRA | x floor | peak MiB "
             "| mem x LoRA |",
             "|---|---|---|---|---|---|---|---|---|"]

    def ratio(row, key):
        return f"{row[key]:.2f}" if key in row else "-"

    for row in result["rows"].values():
        st, mem = row["step_s"], row["peak_mib"]
        lines.append(f"| {row['label']} | {row['trainable'] / 1e6:.2f} M | "
                     f"{row['trainable_pct']:.2f} | {st['median']:.3f} [{st['min']:.3f}-"
                     f"{st['max']:.3f}] | {row['tokens_per_s']:.0f} | {ratio(row, 'step_x_lora')} "
                     f"| {ratio(row, 'step_x_floor')} | {mem['median']:.0f} | "
                     f"{ratio(row, 'mem_x_lora')} |")
    lines += ["", "| target | measured | met |", "|---|---|---|"]
    for t in check_targets(result):
        measured = "-" if t["ratio"] is None else f"{t['ratio']:.2f}"
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {measured} | {met} |")
    return "\n".join(lines)


if __name__ == "__main__":  # child mode: one variant, its result on stdout
    print("RESULT " + json.dumps(measure(StepSpec(**json.loads(sys.argv[1])))), flush=True)
