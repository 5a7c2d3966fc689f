"""Side-by-side step time and peak memory: LoRA-MoE vs single LoRA vs full fine-tune vs a dense
all-experts MoE (top_k = E), on the same model and batch, in one run; plus the two MoE dispatches
on one Llama-3-8B-shaped layer.

Ratios are what to read (this machine is shared and noisy): each variant runs in its own
subprocess, variants interleave over several rounds, and the median is reported.

    python recipes/benchmark.py                           # embedded SmolLM2-135M, CPU
    python recipes/benchmark.py --model meta-llama/Meta-Llama-3-8B --batch 8 --seq 2048
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from sparsedoc import fsio

VARIANTS = {
    "lora": ["adapter.method=lora"],
    "moe_dense": ["adapter.method=lora_moe", "adapter.moe.dispatch=dense"],
    "moe_grouped": ["adapter.method=lora_moe", "adapter.moe.dispatch=grouped"],
    "moe_all_experts": ["adapter.method=lora_moe", "adapter.moe.dispatch=dense",
                        "adapter.moe.top_k={E}"],
    "moe_ffn": ["adapter.method=lora_moe", "adapter.moe.mode=ffn"],
    "full": ["adapter.method=full"],
}


def _peak_bytes() -> int:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated()
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def measure_variant(args) -> dict:
    """Child process: build one variant, time `steps` optimizer steps on a fixed batch."""
    from sparsedoc.config import load_config
    from sparsedoc.models.load import enable_activation_checkpointing, load_model_and_tokenizer
    from sparsedoc.methods import new_method
    from sparsedoc.methods.base import count_parameters

    overrides = [f"model.name_or_path={args.model}", f"adapter.moe.num_experts={args.experts}",
                 f"adapter.moe.top_k={min(2, args.experts)}", "adapter.moe.contrastive=label",
                 "adapter.moe.dropout=0", "adapter.lora.dropout=0"]
    # the variant's own settings come last so they win (e.g. top_k=E for all-experts)
    overrides += [o.format(E=args.experts) for o in VARIANTS[args.variant]]
    cfg = load_config(None, overrides)
    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, _, _ = load_model_and_tokenizer(cfg.model)
    method = new_method(cfg.adapter.method)
    model = method.build(model, cfg).to(dev)
    model.train()
    if args.grad_ckpt:
        enable_activation_checkpointing(model)
    trainable, total = count_parameters(model)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=g).to(dev)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone(),
             # one record per row, four labels
             "record_ids": torch.arange(args.batch, device=dev)[:, None].expand_as(ids).clone(),
             "record_label_ids": torch.arange(args.batch, device=dev) % 4}

    base_mem = _peak_bytes() if not torch.cuda.is_available() else torch.cuda.memory_allocated()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(args.warmup + args.steps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        loss, _ = method.compute_loss(model, batch, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(model, step + 1)
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # CPU-GPU sync point: time the real work
        if step >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"variant": args.variant, "step_s": statistics.median(times),
            "peak_mib": _peak_bytes() / 2**20, "base_mib": base_mem / 2**20,
            "trainable": trainable, "total": total,
            "tokens_per_s": args.batch * args.seq / statistics.median(times)}


def measure_dispatch(d_in: int, d_out: int, tokens: int, E: int, k: int, r: int, iters: int
                     ) -> dict[str, float]:
    """Forward+backward time per dispatch, same weights and input: of the whole layer (frozen
    matmul included) and of the expert computation alone (what the choice changes)."""
    from torch import nn

    from sparsedoc.moe.layer import DISPATCH, LoRAMoELinear

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    base = nn.Linear(d_in, d_out, bias=False).to(dev)
    x = torch.randn(tokens, d_in, device=dev, requires_grad=True)
    layers = {d: LoRAMoELinear(base, E, k, r, alpha=2 * r, dispatch=d).to(dev)
              for d in ("dense", "grouped")}
    layers["grouped"].load_state_dict(layers["dense"].state_dict())
    ref = layers["dense"]
    with torch.no_grad():
        routing = ref.router.route(x)

    def layer_step(d):
        layers[d](x).sum().backward()

    def experts_step(d):
        DISPATCH[d](x, ref.lora_A, ref.lora_B, routing).sum().backward()

    samples: dict[str, list[float]] = {}
    for i in range(iters + 2):
        for d in layers:  # interleaved, so machine noise hits both alike
            for what, fn in (("layer", layer_step), ("experts", experts_step)):
                t0 = time.perf_counter()
                fn(d)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                if i >= 2:
                    samples.setdefault(f"{what}_{d}", []).append(time.perf_counter() - t0)
    return {key: statistics.median(v) for key, v in samples.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default="embedded")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2, help="interleaved repeats of every variant")
    p.add_argument("--grad-ckpt", action="store_true")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--layer-only", action="store_true", help="only the dispatch comparison")
    p.add_argument("--dispatch-iters", type=int, default=7)
    p.add_argument("--json", default="", help="also write the results here")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    args = p.parse_args(argv)

    if args.variant:
        print("RESULT " + json.dumps(measure_variant(args)), flush=True)
        return

    results: dict = {"config": vars(args), "device": "cuda" if torch.cuda.is_available() else "cpu"}
    if not args.layer_only:
        runs: dict[str, list[dict]] = {}
        child = [sys.executable, "-m", "sparsedoc.recipes.benchmark", "--model", args.model,
                 "--batch", str(args.batch), "--seq", str(args.seq), "--experts",
                 str(args.experts), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        child += ["--grad-ckpt"] if args.grad_ckpt else []
        for _ in range(args.rounds):
            for v in args.variants.split(","):
                proc = subprocess.run(child + ["--variant", v], capture_output=True, text=True)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not line:
                    raise SystemExit(f"variant {v} failed:\n{proc.stderr[-3000:]}")
                runs.setdefault(v, []).append(json.loads(line[0][7:]))
        ref = statistics.median(r["step_s"] for r in runs["lora"]) if "lora" in runs else None
        ref_mem = statistics.median(r["peak_mib"] for r in runs["lora"]) if "lora" in runs else None
        print(f"\nstep time and peak memory, batch {args.batch} x seq {args.seq}, "
              f"E={args.experts}, {results['device']}, median of {args.rounds} rounds x "
              f"{args.steps} steps")
        print(f"{'variant':<17}{'trainable':>12}{'%':>8}{'step s':>9}{'tok/s':>9}"
              f"{'x LoRA':>8}{'peak MiB':>10}{'x LoRA':>8}")
        table = {}
        for v, rs in runs.items():
            step = statistics.median(r["step_s"] for r in rs)
            mem = statistics.median(r["peak_mib"] for r in rs)
            r0 = rs[0]
            table[v] = {"step_s": step, "peak_mib": mem, "trainable": r0["trainable"],
                        "trainable_pct": 100 * r0["trainable"] / r0["total"],
                        "tokens_per_s": args.batch * args.seq / step,
                        "step_ratio_vs_lora": step / ref if ref else None,
                        "mem_ratio_vs_lora": mem / ref_mem if ref_mem else None}
            t = table[v]
            print(f"{v:<17}{t['trainable']:>12,}{t['trainable_pct']:>8.3f}{step:>9.3f}"
                  f"{t['tokens_per_s']:>9.0f}{(t['step_ratio_vs_lora'] or 0):>8.2f}"
                  f"{mem:>10.0f}{(t['mem_ratio_vs_lora'] or 0):>8.2f}")
        results["variants"] = table
    shapes = [("attn 4096->4096", 4096, 4096), ("mlp 4096->14336", 4096, 14336)]
    print("\nMoE dispatch on Llama-3-8B-shaped layers (fwd+bwd, E=8, top-2, r=16, 512 tokens)")
    print(f"{'layer':<18}{'part':<9}{'dense s':>10}{'grouped s':>11}{'grouped/dense':>15}")
    results["dispatch"] = {}
    for name, d_in, d_out in shapes:
        t = measure_dispatch(d_in, d_out, 512, 8, 2, 16, iters=args.dispatch_iters)
        results["dispatch"][name] = t
        for part in ("layer", "experts"):
            dense, grouped = t[f"{part}_dense"], t[f"{part}_grouped"]
            print(f"{name:<18}{part:<9}{dense:>10.4f}{grouped:>11.4f}{grouped / dense:>15.2f}")
    if args.json:
        fsio.write_json(args.json, results)


if __name__ == "__main__":
    main()
