"""The small ablation behind the LoRA-MoE contrastive defaults.

Trains the demo MoE once per contrastive setting (same data, seed and steps), then scores each
run on the held-out demo set: LM loss, and routing specialisation, the mutual information
I(department; chosen expert) over real tokens (sparsedoc.eval.routing). Writes
``<out>/ablation.md`` and ``ablation.json``.

    python recipes/ablate_contrastive.py                       # demo config, ~25 min on 2 CPUs
    python recipes/ablate_contrastive.py --variants none,expert__w_0_1__t_0_1 train.max_steps=8
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from sparsedoc.resources import recipe_config_path

VARIANTS = {
    "none": ["adapter.moe.contrastive=none"],
    "label (w=0.1, t=0.1)": ["adapter.moe.contrastive=label", "adapter.moe.contrastive_weight=0.1",
                             "adapter.moe.temperature=0.1"],
    "label (w=0.5, t=0.1)": ["adapter.moe.contrastive=label", "adapter.moe.contrastive_weight=0.5",
                             "adapter.moe.temperature=0.1"],
    "expert (w=0.1, t=0.1)": ["adapter.moe.contrastive=expert",
                              "adapter.moe.contrastive_weight=0.1", "adapter.moe.temperature=0.1"],
    "label (w=0.1, t=0.1), balance 0.05": ["adapter.moe.contrastive=label",
                                           "adapter.moe.contrastive_weight=0.1",
                                           "adapter.moe.temperature=0.1",
                                           "adapter.moe.balance_weight=0.05"],
}


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def score_run(run_dir: Path) -> dict:
    """Held-out loss (from the run) and I(label; expert) of its final adapter on the eval set."""
    import torch

    from sparsedoc.checkpoint import list_checkpoints
    from sparsedoc.config import load_config
    from sparsedoc.data.dataset import eval_batches, make_collator, prepare_data
    from sparsedoc.eval.routing import label_expert_counts, specialization_summary
    from sparsedoc.logging import read_metrics
    from sparsedoc.models.load import load_model_and_tokenizer
    from sparsedoc.moe.inject import load_moe_adapter

    cfg = load_config(run_dir / "config.yaml")
    summary = json.loads((run_dir / "summary.json").read_text())
    model, tok, _ = load_model_and_tokenizer(cfg.model, torch.float32)
    load_moe_adapter(model, list_checkpoints(run_dir)[-1] / "adapter")
    data = prepare_data(cfg.data, tok, cfg.train.seed)
    batches = eval_batches(data.eval, make_collator(cfg.data, tok, data.label_vocab), 8, 0, 1)
    counts, names = label_expert_counts(model, batches, len(data.label_vocab))
    spec = specialization_summary(counts, names)
    per_layer = counts.sum(1)  # (L, E) assignments over all labels
    tokens = per_layer.sum(-1) / cfg.adapter.moe.top_k
    busiest = per_layer.max(-1).values / tokens  # share of tokens sent to the busiest expert
    rows = [r for r in read_metrics(run_dir / "metrics.jsonl") if "moe/busiest_expert_share" in r]
    return {"eval_loss_start": summary["eval_loss_start"],
            "eval_loss_final": summary["eval_loss_final"],
            "mi_bits_mean": spec["mi_bits_mean"], "mi_bits_max": spec["mi_bits_max"],
            "mi_normalised_mean": spec["mi_normalised_mean"],
            "busiest_share_last": rows[-1]["moe/busiest_expert_share"] if rows else None,
            "eval_busiest_share_mean": float(busiest.mean()),
            "eval_collapsed_layers": int((busiest > cfg.adapter.moe.collapse_threshold).sum()),
            "routing_layers": len(names),
            "step_time_s": summary["step_time_s"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(recipe_config_path("moe_demo")))
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--variants", default="",
                   help="comma-separated run-folder names (slugs) to run; default: all of "
                        + ", ".join(slug(n) for n in VARIANTS))
    p.add_argument("overrides", nargs="*", help="key=value applied to every variant")
    args = p.parse_args(argv)
    out = Path(args.out)
    wanted = set(args.variants.split(",")) if args.variants else None
    picks = [n for n in VARIANTS if wanted is None or slug(n) in wanted]
    results = {}
    for name in picks:
        run_dir = out / slug(name)
        if not (run_dir / "summary.json").is_file():  # resumable: finished variants are kept
            cmd = [sys.executable, "-m", "sparsedoc.recipes.train_moe", "--config", args.config,
                   f"train.output_dir={run_dir}", "logging.wandb=false", *VARIANTS[name],
                   *args.overrides]
            print(f"== {name}: {' '.join(cmd[3:])}", flush=True)
            subprocess.run(cmd, check=True)
        results[name] = score_run(run_dir)
    lines = ["| contrastive | held-out loss (start -> end) | I(label; expert) bits, mean / max "
             "over layers | normalised | busiest-expert token share (mean) | layers > 0.9 "
             "| step s |", "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['eval_loss_start']:.4f} -> {r['eval_loss_final']:.4f} | "
                     f"{r['mi_bits_mean']:.4f} / {r['mi_bits_max']:.4f} | "
                     f"{r['mi_normalised_mean']:.4f} | {r['eval_busiest_share_mean']:.3f} | "
                     f"{r['eval_collapsed_layers']} of {r['routing_layers']} | "
                     f"{r['step_time_s']:.2f} |")
    table = "\n".join(lines)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablation.md").write_text(table + "\n")
    (out / "ablation.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
