"""The expert memory queue keeps memory flat: a long tiny run's RSS from step 100 to step N.

The label contrast's negatives come from a ring buffer of past records' routing representations
(``sparsedoc.moe.memory_queue``). It fills in ``queue_size / batch`` steps and then overwrites,
so nothing may grow after that: this runs the LoRA-MoE on the tiny Llama for ``steps`` optimizer
steps with the label contrast and records the process's RSS, its peak since step 100, and the
queue's own bytes along the way.
"""

from __future__ import annotations

import time

import torch

from sparsedoc.bench.step import (StepSpec, _batch, _rss_peak_bytes, _rss_peak_reset, load_base,
                                  variants)


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def measure_queue_memory(steps: int = 1000, queue_size: int = 256, batch: int = 2, seq: int = 32,
                         checkpoints: tuple[int, ...] = (100, 250, 500, 1000)) -> dict:
    """RSS and queue bytes at each checkpoint step; the peak RSS between the first and last."""
    from sparsedoc.config import load_config
    from sparsedoc.methods import new_method
    from sparsedoc.methods.lora_moe import queue_bytes

    spec = StepSpec(variant="moe_dense", model="tiny", batch=batch, seq=seq)
    cfg = load_config(None, ["model.name_or_path=tiny", *variants(8, 2, 8, 16)["moe_dense"]
                             .overrides, f"adapter.moe.queue_size={queue_size}"])
    method = new_method(cfg.adapter.method)
    method.configure(cfg)
    model = method.build(load_base("tiny", torch.float32, 0), cfg).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    checkpoints = tuple(c for c in checkpoints if c <= steps)
    rows, start = [], time.perf_counter()
    for step in range(1, steps + 1):
        # a fresh batch per step (seeded), with record labels, as training sees
        batch_ = _batch(StepSpec(**{**spec.__dict__, "seed": step}), model.config.vocab_size,
                        torch.device("cpu"))
        loss, _ = method.compute_loss(model, batch_, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        method.after_optimizer_step(model, step)
        if step in checkpoints:
            if step == checkpoints[0]:
                _rss_peak_reset()
            rows.append({"step": step, "rss_mib": _rss_bytes() / 2**20,
                         "peak_rss_mib_since_first": _rss_peak_bytes() / 2**20,
                         "queue_bytes": queue_bytes(model),
                         "queue_entries": int((method.label_queue.get(0)[1] >= 0).sum())})
    first, last = rows[0], rows[-1]
    return {"steps": steps, "queue_size": queue_size, "batch": batch, "seq": seq,
            "seconds": time.perf_counter() - start, "rows": rows,
            "rss_growth_mib": last["rss_mib"] - first["rss_mib"],
            "peak_growth_mib": last["peak_rss_mib_since_first"] - first["rss_mib"]}


def format_queue_memory(result: dict) -> str:
    lines = [f"Memory queue (tiny Llama, LoRA-MoE label contrast, queue {result['queue_size']}, "
             f"batch {result['batch']} x {result['seq']}, {result['steps']} steps): RSS grew "
             f"{result['rss_growth_mib']:+.1f} MiB from step {result['rows'][0]['step']} to "
             f"{result['rows'][-1]['step']}; peak {result['peak_growth_mib']:+.1f} MiB over it.",
             "", "| step | RSS MiB | peak RSS MiB since first | queue entries | queue bytes |",
             "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['step']} | {r['rss_mib']:.1f} | {r['peak_rss_mib_since_first']:.1f} "
                     f"| {r['queue_entries']} | {r['queue_bytes']:,} |")
    return "\n".join(lines)
