"""The contrastive ablation: does router supervision shape routing, and what does it cost?

Builds a department-labelled set from real data (the medical subjects of CMMLU in
``../shared/data/cmmlu_med``, converted by ``sparsedoc prepare cmmlu_med``; each subject a label,
a fixed number of held-out records per subject), trains the LoRA-MoE on the embedded
SmolLM2-135M once per arm and seed, and scores every final adapter on the held-out records:

* held-out LM loss (the run's own final evaluation);
* the specialisation metrics ``sparsedoc evaluate`` reports (``sparsedoc.eval.routing``):
  I(label; top-1 expert) per layer in bits and as a fraction of H(label), expert-load entropy,
  the busiest expert's share;
* expert distinctness: the mean pairwise cosine between different experts' outputs
  (``s B_e A_e x``) on the same held-out tokens (``losses.expert_output_similarity``).

Optionally (``--ffn-export``) an FFN-expert run with the label contrast is exported as a stock
Mixtral checkpoint and the held-out records are routed by transformers' own
``MixtralForCausalLM`` (its gates' router logits), to show that the specialisation survives the
export (built, not yet run end to end: see docs/method.md). Results: ``<out>/ablation.{md,json}``
and ``<out>/ablation.png``. Every finished run is kept, so a rerun resumes where the last one
stopped.

    python -m sparsedoc.recipes.ablate_contrastive                  # ~1 h on 2 CPU cores
    python -m sparsedoc.recipes.ablate_contrastive --seeds 0 --arms none,label train.max_steps=4
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

from sparsedoc import fsio
from sparsedoc.artifacts import RUN_SUMMARY, run_finished
from sparsedoc.resources import recipe_config_path

ARMS = {
    "none": ["adapter.moe.contrastive=none"],
    "label": ["adapter.moe.contrastive=label"],
    "expert": ["adapter.moe.contrastive=expert"],
    # the label contrast made to dominate the router's gradient, then with routers that can move
    "label-w1": ["adapter.moe.contrastive=label", "adapter.moe.contrastive_weight=1.0",
                 "adapter.moe.temperature=0.05"],
    "label-w1-router30": ["adapter.moe.contrastive=label", "adapter.moe.contrastive_weight=1.0",
                          "adapter.moe.temperature=0.05", "adapter.moe.router_lr_scale=30"],
    # the routing's information about the label itself, the quantity the ceiling maximises
    "label-mi": ["adapter.moe.contrastive=label_mi"],
    "label-mi-w1-router30": ["adapter.moe.contrastive=label_mi",
                             "adapter.moe.contrastive_weight=1.0",
                             "adapter.moe.router_lr_scale=30"],
}
DEFAULT_ARMS = "none,label,expert"
FFN_ARM = ["adapter.moe.mode=ffn", "adapter.moe.contrastive=label"]
# The settings every arm shares (on top of the demo config), sized for 2 CPU cores, where a
# training step of 8 records takes ~14 s: 40 steps of 4 records (160 of the ~790 training
# records), ~9.5 min per run. docs/method.md has the measured results.
COMMON = ["data.max_seq_len=256", "train.micro_batch_size=4", "train.max_steps=40",
          "train.warmup_steps=0", "train.eval_every=40", "train.save_every=40", "train.log_every=5",
          "logging.wandb=false", "adapter.moe.router_calibration_batches=4"]


# ---- data -------------------------------------------------------------------------------------
def build_data(src: Path, out: Path, eval_per_label: int, train_per_label: int, seed: int
               ) -> dict:
    """Convert CMMLU's medical subjects and split them per subject into train and held-out
    files (seeded, disjoint by record id). Returns the label counts per split."""
    from sparsedoc.data.schema import read_jsonl, routing_label, write_jsonl
    from sparsedoc.prep import cmmlu_med

    train_file, eval_file = out / "train.jsonl", out / "eval.jsonl"
    stats_file = out / "split.json"
    if stats_file.is_file():
        return json.loads(stats_file.read_text())
    converted = out / "converted"
    cmmlu_med.convert(src, converted)
    by_label: dict[str, list[dict]] = defaultdict(list)
    for f in sorted(converted.glob("*.jsonl")):
        for r in read_jsonl(f):
            by_label[routing_label(r)].append(r)
    rng = random.Random(seed)
    train, held_out = [], []
    for label in sorted(by_label):
        records = sorted(by_label[label], key=lambda r: r["id"])
        rng.shuffle(records)
        held_out += records[:eval_per_label]
        train += records[eval_per_label:eval_per_label + train_per_label]
    rng.shuffle(train)
    write_jsonl(train_file, train)
    write_jsonl(eval_file, held_out)
    stats = {"source": str(src), "train": _label_counts(train), "eval": _label_counts(held_out)}
    fsio.write_json(stats_file, stats)
    return stats


def _label_counts(records: list[dict]) -> dict[str, int]:
    from sparsedoc.data.schema import routing_label

    counts: dict[str, int] = defaultdict(int)
    for r in records:
        counts[routing_label(r)] += 1
    return dict(sorted(counts.items()))


# ---- scoring ------------------------------------------------------------------------------------
def _held_out(cfg, tokenizer):
    from sparsedoc.data.dataset import eval_batches, make_collator, prepare_data

    data = prepare_data(cfg.data, tokenizer, cfg.train.seed)
    collate = make_collator(cfg.data, tokenizer, data.label_vocab)
    return data, eval_batches(data.eval, collate, 8, 0, 1)


def expert_distinctness(model, batches: list[dict], tokens_per_batch: int = 64) -> float:
    """Mean over layers and the given held-out batches of the mean pairwise cosine between
    different experts' outputs on the same (sampled) real tokens."""
    import torch

    from sparsedoc.moe.losses import expert_output_similarity
    from sparsedoc.moe.record import record_routing
    from sparsedoc.data.batch import model_inputs, real_tokens

    g = torch.Generator().manual_seed(0)
    values = []
    model.eval()
    with torch.no_grad():
        for batch in batches:
            valid = real_tokens(batch).reshape(-1).nonzero().squeeze(-1)
            rows = valid[torch.randperm(len(valid), generator=g)[:tokens_per_batch]].sort().values
            with record_routing(sample_rows=rows) as record:
                model(**model_inputs(batch))
            values += [float(expert_output_similarity(s.outputs))
                       for s in record.expert_outputs.values()]
    return sum(values) / len(values)


def score_run(run_dir: Path) -> dict:
    """Held-out loss (from the run), specialisation and expert distinctness of its adapter."""
    import torch

    from sparsedoc.artifacts import locate
    from sparsedoc.eval.routing import label_expert_counts, specialization_summary
    from sparsedoc.models.load import load_model_and_tokenizer
    from sparsedoc.moe.inject import load_moe_adapter

    run = locate(run_dir)
    cfg = run.config()
    summary = json.loads((run_dir / RUN_SUMMARY).read_text())
    model, tok, _ = load_model_and_tokenizer(cfg.model, torch.float32)
    load_moe_adapter(model, run.adapter_dir)
    data, batches = _held_out(cfg, tok)
    top1, assigned, names = label_expert_counts(model, batches, len(data.label_vocab))
    spec = specialization_summary(top1, assigned, names, cfg.adapter.moe.top_k)
    return {"eval_loss_start": summary["eval_loss_start"],
            "eval_loss_final": summary["eval_loss_final"],
            **{k: v for k, v in spec.items() if k != "per_layer"},
            "mi_bits_per_layer": [v["mi_bits"] for v in spec["per_layer"].values()],
            "expert_output_cosine": expert_distinctness(model, batches[:4]),
            "routing_layers": len(names), "step_time_s": summary["step_time_s"],
            "steps": summary["steps"]}


def fit_ceiling_router(train_x, train_labels, eval_x, eval_labels, num_labels: int,
                       num_experts: int, steps: int = 300, lr: float = 1e-2, seed: int = 0
                       ) -> float:
    """Held-out I(label; top-1 expert) in bits of the best linear E-way router found on fixed
    token features: one ``Linear(d, E)`` fitted by full-batch Adam to maximise the soft
    ``I = H(E) - H(E | label)`` of its softmax on the training tokens, then scored by its
    hard top-1 on the held-out tokens (``eval.routing.mutual_information``)."""
    import torch

    from sparsedoc.eval.routing import mutual_information

    torch.manual_seed(seed)
    router = torch.nn.Linear(train_x.shape[1], num_experts)
    opt = torch.optim.Adam(router.parameters(), lr)
    onehot = torch.nn.functional.one_hot(train_labels, num_labels).float()  # (T, labels)
    share = onehot.mean(0)
    for _ in range(steps):
        p = router(train_x).softmax(-1)  # (T, E)
        p_e = p.mean(0)
        p_e_given_l = (onehot.t() @ p) / onehot.sum(0).clamp_min(1).unsqueeze(-1)
        h_e = -(p_e * p_e.clamp_min(1e-12).log()).sum()
        h_e_l = -(share * (p_e_given_l * p_e_given_l.clamp_min(1e-12).log()).sum(-1)).sum()
        loss = h_e_l - h_e
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        top1 = router(eval_x).argmax(-1)
    counts = torch.bincount(eval_labels * num_experts + top1,
                            minlength=num_labels * num_experts).view(num_labels, num_experts)
    return float(mutual_information(counts.float()))


def routing_ceiling(run_dir: Path, every: int = 6, train_batches: int = 30) -> dict:
    """How much label information a linear top-1 router *can* carry here, per token.

    Features are the inputs of the first MoE layer of every ``every``-th decoder block in the
    run's model before training (B = 0: the frozen model's own hidden states), on training
    tokens (to fit ``fit_ceiling_router``) and on the held-out tokens the arms are scored on.
    The trained arms route on features the adapters may have moved, so this is a reference
    point, not a strict bound."""
    import torch

    from sparsedoc.artifacts import locate
    from sparsedoc.data.dataset import eval_batches, make_collator, prepare_data
    from sparsedoc.models.load import load_model_and_tokenizer
    from sparsedoc.moe.inject import block_index, inject_lora_moe, moe_layers
    from sparsedoc.data.batch import model_inputs

    cfg = locate(run_dir).config()
    model, tok, _ = load_model_and_tokenizer(cfg.model, torch.float32)
    inject_lora_moe(model, cfg.adapter.moe)
    picked, seen = {}, set()
    for name, layer in moe_layers(model):
        b = block_index(name)
        if b is not None and b % every == 0 and b not in seen:
            seen.add(b)
            picked[name] = layer
    data = prepare_data(cfg.data, tok, cfg.train.seed)
    collate = make_collator(cfg.data, tok, data.label_vocab)
    sets = {"train": eval_batches(data.train, collate, 8, 0, 1, train_batches),
            "eval": eval_batches(data.eval, collate, 8, 0, 1)}
    feats: dict[str, dict[str, list]] = {k: {n: [] for n in picked} for k in sets}
    labels: dict[str, list] = {k: [] for k in sets}
    model.eval()
    for split, batches in sets.items():
        current: dict[str, torch.Tensor] = {}
        hooks = [layer.register_forward_hook(
            lambda mod, args, out, n=n: current.__setitem__(n, args[0].detach()))
            for n, layer in picked.items()]
        with torch.no_grad():
            for batch in batches:
                model(**model_inputs(batch))
                ids = batch["record_ids"].reshape(-1)
                keep = ids >= 0
                tok_labels = batch["record_label_ids"][ids[keep]]
                keep_l = tok_labels >= 0
                labels[split].append(tok_labels[keep_l])
                for n in picked:
                    x = current[n].reshape(ids.numel(), -1)[keep][keep_l]
                    feats[split][n].append(x.float())
        for h in hooks:
            h.remove()
    y_tr, y_ev = torch.cat(labels["train"]), torch.cat(labels["eval"])
    counts = torch.bincount(y_ev, minlength=len(data.label_vocab)).float()
    p = counts[counts > 0] / counts.sum()
    h_label = float(-(p * p.log2()).sum())
    per_layer = {n: fit_ceiling_router(torch.cat(feats["train"][n]), y_tr,
                                       torch.cat(feats["eval"][n]), y_ev, len(data.label_vocab),
                                       cfg.adapter.moe.num_experts)
                 for n in picked}
    mean = sum(per_layer.values()) / len(per_layer)
    return {"mi_bits_per_layer": per_layer, "mi_bits_mean": mean, "label_entropy_bits": h_label,
            "mi_fraction_mean": mean / h_label, "train_tokens": len(y_tr),
            "eval_tokens": len(y_ev)}


def mixtral_routing(run_dir: Path, out: Path) -> dict:
    """Export the run as a stock Mixtral checkpoint, route the held-out records with
    transformers' ``MixtralForCausalLM`` (no sparsedoc code in the forward) and measure
    I(label; top-1 expert) from its router logits; also the same measure on the sparsedoc
    model, on the same tokens."""
    import torch
    from transformers import AutoModelForCausalLM

    from sparsedoc.artifacts import locate
    from sparsedoc.eval.routing import add_counts, label_expert_counts, specialization_summary
    from sparsedoc.export import ExportOptions, export
    from sparsedoc.models.load import load_model_and_tokenizer
    from sparsedoc.moe.inject import load_moe_adapter
    from sparsedoc.data.batch import model_inputs

    export_dir = out / "mixtral"
    if not (export_dir / "config.json").is_file():
        export(run_dir, export_dir, ExportOptions(mode="mixtral", force=True))
    run = locate(run_dir)
    cfg = run.config()
    model, tok, _ = load_model_and_tokenizer(cfg.model, torch.float32)
    load_moe_adapter(model, run.adapter_dir)
    data, batches = _held_out(cfg, tok)
    top1, assigned, names = label_expert_counts(model, batches, len(data.label_vocab))
    ours = specialization_summary(top1, assigned, names, cfg.adapter.moe.top_k)

    stock = AutoModelForCausalLM.from_pretrained(export_dir, dtype=torch.float32).eval()
    L, E, k = stock.config.num_hidden_layers, stock.config.num_local_experts, \
        stock.config.num_experts_per_tok
    n_labels = len(data.label_vocab)
    s_top1 = torch.zeros(L, n_labels, E, dtype=torch.float64)
    s_assigned = torch.zeros(L, E, dtype=torch.float64)
    with torch.no_grad():
        for batch in batches:
            record_ids = batch["record_ids"].reshape(-1)
            real = record_ids >= 0
            labels = batch["record_label_ids"][record_ids[real]]
            keep = labels >= 0
            res = stock(**model_inputs(batch), output_router_logits=True)
            for layer, logits in enumerate(res.router_logits):  # (B*S, E) per layer
                top = logits.float().topk(k, dim=-1).indices[real][keep]
                add_counts(s_top1[layer], s_assigned[layer], top, labels[keep])
    theirs = specialization_summary(s_top1, s_assigned, [f"layers.{i}" for i in range(L)], k)
    same = bool(torch.equal(s_top1, top1))
    return {"export_dir": str(export_dir), "stock_mixtral_mi_bits_mean": theirs["mi_bits_mean"],
            "stock_mixtral_mi_fraction_mean": theirs["mi_fraction_mean"],
            "sparsedoc_mi_bits_mean": ours["mi_bits_mean"],
            "sparsedoc_mi_fraction_mean": ours["mi_fraction_mean"],
            "same_top1_counts": same, "label_entropy_bits": theirs["label_entropy_bits"]}


# ---- report -----------------------------------------------------------------------------------
def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs)


def report(results: dict[str, dict[int, dict]], out: Path, ffn: dict | None,
           ceiling: dict | None = None) -> str:
    """Markdown table per arm (mean over seeds, each seed in brackets), targets, and a plot."""
    lines = ["| arm | seeds | held-out loss (end) | I(label; top-1 expert) bits | fraction of "
             "H(label) | load entropy bits | busiest share | expert-output cosine | step s |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(arm: str, key: str, fmt: str) -> str:
        vals = [r[key] for r in results[arm].values()]
        each = ", ".join(format(v, fmt) for v in vals)
        return f"{format(_mean(vals), fmt)} ({each})" if len(vals) > 1 else format(vals[0], fmt)

    for arm in results:
        lines.append(f"| {arm} | {len(results[arm])} | {cell(arm, 'eval_loss_final', '.4f')} | "
                     f"{cell(arm, 'mi_bits_mean', '.4f')} | {cell(arm, 'mi_fraction_mean', '.4f')}"
                     f" | {cell(arm, 'load_entropy_bits_mean', '.3f')} | "
                     f"{cell(arm, 'busiest_share_mean', '.3f')} | "
                     f"{cell(arm, 'expert_output_cosine', '.4f')} | "
                     f"{cell(arm, 'step_time_s', '.2f')} |")
    m = {arm: {k: _mean([r[k] for r in runs.values()]) for k in
               ("eval_loss_final", "mi_bits_mean", "mi_fraction_mean", "expert_output_cosine")}
         for arm, runs in results.items()}
    any_run = next(iter(next(iter(results.values())).values()))
    lines += ["", f"H(label) = {any_run['label_entropy_bits']:.3f} bits; balanced busiest share = "
              f"{any_run['balanced_busiest_share']:.2f}; maximum load entropy = "
              f"{any_run['load_entropy_max_bits']:.2f} bits; {any_run['routing_layers']} routing "
              f"layers; {any_run['steps']} steps.", ""]
    if "none" in m:
        base = m["none"]
        for arm in m:
            if arm == "none":
                continue
            cost = 100 * (m[arm]["eval_loss_final"] / base["eval_loss_final"] - 1)
            ratio = m[arm]["mi_bits_mean"] / max(base["mi_bits_mean"], 1e-12)
            lines.append(f"- **{arm}** vs none: held-out loss {cost:+.2f}%, I(label; top-1) "
                         f"x{ratio:.1f}, fraction of H {m[arm]['mi_fraction_mean']:.4f} "
                         f"(none {base['mi_fraction_mean']:.4f}), expert-output cosine "
                         f"{m[arm]['expert_output_cosine']:.4f} (none "
                         f"{base['expert_output_cosine']:.4f})")
    if ceiling:
        lines.append(f"- **reference, the most a linear router can carry**: one fitted to "
                     f"maximise I(label; expert) on the frozen model's router inputs "
                     f"({len(ceiling['mi_bits_per_layer'])} layers, "
                     f"{ceiling['train_tokens']} training tokens) reaches "
                     f"{ceiling['mi_bits_mean']:.3f} bits ({ceiling['mi_fraction_mean']:.3f} of H) "
                     f"on the held-out tokens (per layer: "
                     + ", ".join(f"{v:.2f}" for v in ceiling["mi_bits_per_layer"].values()) + ")")
    if ffn:
        lines.append(f"- **FFN mode, label contrast, exported as Mixtral**: stock "
                     f"`MixtralForCausalLM` routes the held-out records with I(label; top-1) = "
                     f"{ffn['stock_mixtral_mi_bits_mean']:.4f} bits "
                     f"({ffn['stock_mixtral_mi_fraction_mean']:.3f} of H); the sparsedoc model "
                     f"{ffn['sparsedoc_mi_bits_mean']:.4f} bits; identical top-1 counts: "
                     f"{ffn['same_top1_counts']}")
    text = "\n".join(lines) + "\n"
    _plot(results, out / "ablation.png")
    return text


def _plot(results: dict[str, dict[int, dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    for arm, runs in results.items():
        for seed, r in runs.items():
            axes[0].plot(r["mi_bits_per_layer"], lw=0.8, label=f"{arm} (seed {seed})")
    any_run = next(iter(next(iter(results.values())).values()))
    axes[0].axhline(any_run["label_entropy_bits"], color="grey", ls="--", lw=1, label="H(label)")
    axes[0].set_xlabel("routing layer (model order)")
    axes[0].set_ylabel("I(label; top-1 expert) [bits]")
    axes[0].legend(fontsize=6)
    arms = list(results)
    for i, arm in enumerate(arms):
        xs = [r["eval_loss_final"] for r in results[arm].values()]
        ys = [r["mi_fraction_mean"] for r in results[arm].values()]
        axes[1].scatter(xs, ys, label=arm)
    axes[1].set_xlabel("held-out LM loss")
    axes[1].set_ylabel("I(label; top-1) / H(label), mean over layers")
    axes[1].legend(fontsize=7)
    fig.suptitle("contrastive ablation (held-out records)", fontsize=9)
    fig.tight_layout()
    fsio.save_figure(fig, path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--config", default=str(recipe_config_path("moe_demo")))
    p.add_argument("--src", default="../shared/data/cmmlu_med",
                   help="the CMMLU medical subjects, as released (sparsedoc prepare cmmlu_med)")
    p.add_argument("--out", default="runs/ablation")
    p.add_argument("--arms", default=DEFAULT_ARMS, help=f"comma-separated, of {list(ARMS)}")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: report the runs that have finished, list the others")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--eval-per-label", type=int, default=12)
    p.add_argument("--train-per-label", type=int, default=110)
    p.add_argument("--ffn-export", action="store_true",
                   help="also train FFN mode with the label contrast and route its Mixtral export")
    p.add_argument("--ceiling", action="store_true",
                   help="also fit the best linear router on the frozen model's router inputs: "
                        "how much label information per token there is to route on")
    p.add_argument("overrides", nargs="*", help="key=value applied to every run")
    args = p.parse_args(argv)
    out = Path(args.out)
    split = build_data(Path(args.src), out / "data", args.eval_per_label, args.train_per_label, 0)
    print(f"data: train {split['train']}\n      held-out {split['eval']}", flush=True)
    data = [f"data.train_files=[{out / 'data' / 'train.jsonl'}]",
            f"data.eval_files=[{out / 'data' / 'eval.jsonl'}]"]
    runs = [(arm, int(seed), ARMS[arm]) for arm in args.arms.split(",")
            for seed in args.seeds.split(",")]
    if args.ffn_export:
        runs.append(("ffn-label", int(args.seeds.split(",")[0]), FFN_ARM))
    results: dict[str, dict[int, dict]] = defaultdict(dict)
    for arm, seed, arm_overrides in runs:
        run_dir = out / f"{arm}-seed{seed}"
        if args.report_only and not run_finished(run_dir):
            print(f"== {arm} seed {seed}: not run", flush=True)
            continue
        if not run_finished(run_dir):  # resumable: finished runs are kept
            cmd = [sys.executable, "-m", "sparsedoc.recipes.train_moe", "--config", args.config,
                   f"train.output_dir={run_dir}", f"train.seed={seed}", *COMMON, *data,
                   *arm_overrides, *args.overrides]
            print(f"== {arm} seed {seed}: {' '.join(cmd[3:])}", flush=True)
            subprocess.run(cmd, check=True)
        score_file = run_dir / "score.json"
        if not score_file.is_file():
            fsio.write_json(score_file, score_run(run_dir))
        results[arm][seed] = json.loads(score_file.read_text())
    arms = {a: r for a, r in results.items() if a != "ffn-label"}
    ceiling = None
    if args.ceiling:
        ceiling_file = out / "ceiling.json"
        if not ceiling_file.is_file():
            arm = next(iter(arms))  # any finished run: the ceiling uses its data and model
            fsio.write_json(ceiling_file,
                            routing_ceiling(out / f"{arm}-seed{next(iter(arms[arm]))}"))
        ceiling = json.loads(ceiling_file.read_text())
    write_report(out, arms, split, None, ceiling)  # the arms stand even if the export fails
    if args.ffn_export:
        ffn_dir = out / f"ffn-label-seed{int(args.seeds.split(',')[0])}"
        write_report(out, arms, split, mixtral_routing(ffn_dir, ffn_dir), ceiling)


def write_report(out: Path, arms: dict, split: dict, ffn: dict | None,
                 ceiling: dict | None = None) -> None:
    table = report(arms, out, ffn, ceiling)
    print(table, flush=True)
    fsio.write_text(out / "ablation.md", table)
    fsio.write_json(out / "ablation.json",
                    {"data": split, "runs": arms, "ffn": ffn, "ceiling": ceiling})


if __name__ == "__main__":
    main()
