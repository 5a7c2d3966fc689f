"""``sparsedoc bench``: the cost of every method, side by side, from one run.

    sparsedoc bench --preset tiny                    # seconds: every row, for CI
    sparsedoc bench --preset smollm2 --json runs/bench.json --markdown runs/bench.md
    sparsedoc bench --dry-run llama3-8b              # meta device: params, FLOPs, ZeRO memory
    sparsedoc bench --preset smollm2 --generation    # KV-cache decoding tokens/s as well
    sparsedoc bench --layers                         # the two dispatches on Llama-3-8B shapes
    sparsedoc bench --no-steps --queue               # memory queue: RSS flat over 1000 steps

Ratios are what to read: the machine is shared, so variants run in their own processes,
interleaved over rounds, and every figure is a median with its min and max.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import time

import torch

from sparsedoc import fsio
from sparsedoc.bench.step import PRESETS, StepSpec, format_steps, run_steps, variants

# per preset: (steps per round, warm-up steps, rounds)
SCHEDULE = {"tiny": (3, 1, 2), "smollm2": (3, 1, 3)}


def default_variants() -> list[str]:
    """Every row whose code is installed (MixLoRA is an optional peer)."""
    names = list(variants(8, 2, 8, 16))
    if importlib.util.find_spec("mixlora") is None:
        names.remove("mixlora")
    return names


def measure_dispatch(d_in: int, d_out: int, tokens: int, E: int, k: int, r: int, iters: int
                     ) -> dict[str, float]:
    """Forward+backward seconds per dispatch, same weights and input: of the whole layer (frozen
    matmul included) and of the expert computation alone (what the choice changes)."""
    from torch import nn

    from sparsedoc.moe.layer import DISPATCH, LoRAMoELinear

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).to(dev)
    x = torch.randn(tokens, d_in, device=dev, requires_grad=True)
    layers = {d: LoRAMoELinear(base, E, k, r, alpha=2 * r, dispatch=d).to(dev) for d in DISPATCH}
    for layer in layers.values():
        layer.load_state_dict(layers["dense"].state_dict())
    ref = layers["dense"]
    with torch.no_grad():
        routing = ref.router.route(x)
    samples: dict[str, list[float]] = {}
    for i in range(iters + 2):
        for d in layers:  # interleaved, so machine noise hits every dispatch alike
            for part in ("layer", "experts"):
                t0 = time.perf_counter()
                if part == "layer":
                    layers[d](x).sum().backward()
                else:
                    DISPATCH[d](x, ref.lora_A, ref.lora_B, routing, ref.scaling).sum().backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 2:
                    samples.setdefault(f"{part}_{d}", []).append(time.perf_counter() - t0)
    return {key: statistics.median(v) for key, v in samples.items()}


def _layers(iters: int) -> tuple[dict, str]:
    shapes = [("attn 4096->4096", 4096, 4096), ("mlp 4096->14336", 4096, 14336)]
    out, lines = {}, ["MoE dispatch on Llama-3-8B-shaped layers (fwd+bwd, E=8, top-2, r=16, "
                      "512 tokens), median seconds", "", "| layer | part | dense | grouped "
                      "| grouped / dense |", "|---|---|---|---|---|"]
    for name, d_in, d_out in shapes:
        t = out[name] = measure_dispatch(d_in, d_out, 512, 8, 2, 16, iters)
        for part in ("layer", "experts"):
            dense, grouped = t[f"{part}_dense"], t[f"{part}_grouped"]
            lines.append(f"| {name} | {part} | {dense:.4f} | {grouped:.4f} | "
                         f"{grouped / dense:.2f} |")
    return out, "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparsedoc bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="smollm2")
    p.add_argument("--model", help="a model folder or hub id instead of the preset's model")
    p.add_argument("--batch", type=int)
    p.add_argument("--seq", type=int)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--r", type=int, default=8, help="expert rank")
    p.add_argument("--lora-r", type=int, default=16, help="the single LoRA's rank")
    p.add_argument("--steps", type=int)
    p.add_argument("--warmup", type=int)
    p.add_argument("--rounds", type=int)
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--grad-ckpt", action="store_true", help="activation checkpointing")
    p.add_argument("--variants", help="comma-separated rows (default: all installed): "
                   + ",".join(variants(8, 2, 8, 16)))
    p.add_argument("--no-steps", action="store_true", help="skip the training-step table")
    p.add_argument("--dry-run", metavar="MODEL", help="llama3-8b, smollm2 or tiny on the meta "
                   "device: parameters, FLOPs, ZeRO-2/3 memory per GPU (nothing is measured)")
    p.add_argument("--generation", action="store_true", help="also time KV-cache decoding")
    p.add_argument("--layers", action="store_true", help="also the dispatches on 8B shapes")
    p.add_argument("--queue", action="store_true", help="also the memory queue's RSS over a "
                   "1000-step tiny run (flat once the queue is full)")
    p.add_argument("--layer-iters", type=int, default=7)
    p.add_argument("--json", help="write every figure here")
    p.add_argument("--markdown", help="write the tables here")
    args = p.parse_args(argv)

    results: dict = {"command": "sparsedoc bench " + " ".join(argv or [])}
    sections: list[str] = []
    if args.dry_run:
        from sparsedoc.bench.dryrun import dry_run, format_dry_run

        results["dry_run"] = dry_run(args.dry_run)
        sections.append(format_dry_run(results["dry_run"]))
        print(sections[-1], flush=True)
    elif not args.no_steps:
        model, batch, seq = PRESETS[args.preset]
        steps, warmup, rounds = SCHEDULE[args.preset]
        spec = StepSpec(variant="", model=args.model or model, batch=args.batch or batch,
                        seq=args.seq or seq, experts=args.experts, top_k=args.top_k, r=args.r,
                        lora_r=args.lora_r, steps=args.steps or steps,
                        warmup=warmup if args.warmup is None else args.warmup,
                        dtype=args.dtype, grad_ckpt=args.grad_ckpt)
        names = args.variants.split(",") if args.variants else default_variants()
        known = variants(spec.experts, spec.top_k, spec.r, spec.lora_r)
        unknown = [n for n in names if n not in known]
        if unknown:
            p.error(f"--variants: unknown {unknown}; known: {', '.join(known)}")
        rounds = args.rounds or rounds
        from tqdm import tqdm

        runs = (rounds + (0 if torch.cuda.is_available() else 1)) * len(names)
        with tqdm(total=runs, desc="bench", unit="run") as bar:
            results["steps"] = run_steps(spec, names, rounds,
                                         progress=lambda n: (bar.set_postfix_str(n),
                                                             bar.update()))
        sections.append(format_steps(results["steps"]))
        print("\n" + sections[-1], flush=True)
    if args.generation:
        from sparsedoc.bench.generation import format_generation, measure_generation

        from sparsedoc.config import ModelCfg
        from sparsedoc.models.load import resolve_model_path

        model = args.model or PRESETS[args.preset][0]
        if model == "tiny":
            p.error("--generation times a saved model: use --preset smollm2 or --model DIR")
        results["generation"] = measure_generation(str(resolve_model_path(
            ModelCfg(name_or_path=model))))
        sections.append(format_generation(results["generation"]))
        print("\n" + sections[-1], flush=True)
    if args.queue:
        from sparsedoc.bench.queue import format_queue_memory, measure_queue_memory

        results["queue"] = measure_queue_memory()
        sections.append(format_queue_memory(results["queue"]))
        print("\n" + sections[-1], flush=True)
    if args.layers:
        results["layers"], text = _layers(args.layer_iters)
        sections.append(text)
        print("\n" + text, flush=True)
    if args.json:
        fsio.write_json(args.json, results)
    if args.markdown:
        fsio.write_text(args.markdown, "\n\n".join(sections) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
