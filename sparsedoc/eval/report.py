"""Compare runs: mean +/- std over seeds of every evaluation metric, per method.

    sparsedoc report runs/moe-s0 runs/moe-s1 runs/lora-s0 runs/lora-s1 --out runs/report
    sparsedoc report runs/sweep/*_seed* --group-by adapter.method,adapter.lora.r

Each run folder contributes its ``config.yaml`` (method, hyper-parameters, seed), its
``summary.json`` (trainable-parameter share, training time) and its ``eval/<task>.json`` files
(``metrics``: accuracies, ROUGE, BERTScore, in percent). A folder of task JSONs without a
config (a base model's ``runs/eval/<model>``) is a group of its own, named after the folder.
Runs are grouped by ``--group-by`` config keys (default ``adapter.method``); the table shows,
per group, the number of runs, the seeds, the mean trainable %, the mean +/- std training time,
and mean +/- std of every metric. std is the *sample* standard deviation (n - 1); a group of one
run has no std (shown as its mean alone). Written: ``report.md``, ``report.csv``,
``report.json`` and ``report.png`` (bars with std error bars).
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from sparsedoc import fsio
from sparsedoc.artifacts import EVAL_DIR, RUN_CONFIG, RUN_SUMMARY, run_finished
from sparsedoc.config import flatten
from sparsedoc.eval.stats import mean_std

METRIC_ORDER = ("acc_loglik", "acc_generate", "rouge1", "rouge2", "rougeL", "rougeLsum",
                "bertscore_f1")
DEFAULT_EXCLUDE = ("*/unparsed_*",)


@dataclass
class RunRecord:
    path: Path
    group: str
    seed: int | None
    trainable_pct: float | None
    train_seconds: float | None
    metrics: dict[str, float]  # "task/metric" -> value (percent)


@dataclass
class GroupRow:
    group: str
    runs: list[RunRecord]
    trainable_pct: float | None
    train_minutes: tuple[float, float]  # mean, std
    metrics: dict[str, tuple[float, float, int]] = field(default_factory=dict)  # mean, std, n

    @property
    def seeds(self) -> str:
        return ",".join(str(r.seed) for r in self.runs if r.seed is not None) or "-"


def _eval_files(run: Path) -> list[Path]:
    folder = run / EVAL_DIR if (run / EVAL_DIR).is_dir() else run
    out = []
    for p in sorted(folder.glob("*.json")):
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and "task" in data and "metrics" in data:
            out.append(p)
    return out


def group_label(config: dict, keys: list[str], fallback: str) -> str:
    """``lora`` for one key; ``lora r=8`` (last part of each further key) for more."""
    if not config:
        return fallback
    parts = []
    for i, k in enumerate(keys):
        v = config.get(k, "?")
        parts.append(str(v) if i == 0 else f"{k.rsplit('.', 1)[-1]}={v}")
    return " ".join(parts)


def read_run(path: str | Path, group_by: list[str]) -> RunRecord:
    """One run folder (or a folder of task JSONs) as a ``RunRecord``."""
    path = Path(path)
    cfg_path = path / RUN_CONFIG
    config = flatten(yaml.safe_load(cfg_path.read_text()) or {}) if cfg_path.is_file() else {}
    summary = {}
    if run_finished(path):
        summary = json.loads((path / RUN_SUMMARY).read_text())
    metrics = {}
    for f in _eval_files(path):
        data = json.loads(f.read_text(encoding="utf-8"))
        for k, v in data["metrics"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                metrics[f"{data['task']}/{k}"] = float(v)
    if not metrics:
        raise FileNotFoundError(f"{path}: no evaluation results (eval/<task>.json); run "
                                f"sparsedoc evaluate --model {path} first")
    seed = config.get("train.seed")
    return RunRecord(path, group_label(config, group_by, path.name),
                     int(seed) if seed is not None else None, summary.get("trainable_pct"),
                     summary.get("train_seconds"), metrics)


def _metric_sort_key(name: str) -> tuple:
    task, _, metric = name.partition("/")
    rank = METRIC_ORDER.index(metric) if metric in METRIC_ORDER else len(METRIC_ORDER)
    return (task, rank, metric)


def select_metrics(runs: list[RunRecord], patterns: list[str] | None) -> list[str]:
    names = sorted({m for r in runs for m in r.metrics}, key=_metric_sort_key)
    if patterns:
        return [n for n in names if any(fnmatch.fnmatch(n, p) for p in patterns)]
    return [n for n in names if not any(fnmatch.fnmatch(n, p) for p in DEFAULT_EXCLUDE)]


def aggregate(runs: list[RunRecord], metrics: list[str]) -> list[GroupRow]:
    """One row per group, in the order groups first appear."""
    groups: dict[str, list[RunRecord]] = {}
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    rows = []
    for name, members in groups.items():
        pct = [r.trainable_pct for r in members if r.trainable_pct is not None]
        secs = [r.train_seconds / 60 for r in members if r.train_seconds is not None]
        row = GroupRow(name, members, sum(pct) / len(pct) if pct else None, mean_std(secs))
        for m in metrics:
            vals = [r.metrics[m] for r in members if m in r.metrics]
            if vals:
                mean, std = mean_std(vals)
                row.metrics[m] = (mean, std, len(vals))
        rows.append(row)
    return rows


def fmt_mean_std(mean: float, std: float, digits: int = 2) -> str:
    if math.isnan(mean):
        return "-"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def to_markdown(rows: list[GroupRow], metrics: list[str]) -> str:
    head = ["method", "runs", "seeds", "trainable %", "train time (min)"] + \
        [m.replace("/", " ") for m in metrics]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.group, str(len(r.runs)), r.seeds,
                 "-" if r.trainable_pct is None else f"{r.trainable_pct:.3f}",
                 fmt_mean_std(*r.train_minutes, digits=1)]
        for m in metrics:
            mean, std, n = r.metrics.get(m, (math.nan, math.nan, 0))
            cell = fmt_mean_std(mean, std)
            cells.append(cell if n in (0, len(r.runs)) else f"{cell} (n={n})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def to_csv(rows: list[GroupRow], metrics: list[str], path: Path) -> None:
    head = ["method", "runs", "seeds", "trainable_pct", "train_minutes_mean",
            "train_minutes_std"]
    for m in metrics:
        head += [f"{m}_mean", f"{m}_std", f"{m}_n"]
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(head)
        for r in rows:
            line = [r.group, len(r.runs), r.seeds, "" if r.trainable_pct is None else
                    r.trainable_pct, *(_num(x) for x in r.train_minutes)]
            for m in metrics:
                mean, std, n = r.metrics.get(m, (math.nan, math.nan, 0))
                line += [_num(mean), _num(std), n]
            w.writerow(line)


def _num(x: float):
    return "" if x is None or math.isnan(x) else repr(float(x))


def plot(rows: list[GroupRow], metrics: list[str], path: Path, max_metrics: int = 24) -> Path:
    """Bars per method for each metric, error bars = std over runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = metrics[:max_metrics]
    cols = min(3, len(shown)) or 1
    nrows = -(-len(shown) // cols) or 1
    fig, axes = plt.subplots(nrows, cols, figsize=(4.2 * cols, 3.2 * nrows), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, m in zip(axes.flat, shown):
        means = [r.metrics.get(m, (math.nan, math.nan, 0))[0] for r in rows]
        stds = [r.metrics.get(m, (math.nan, math.nan, 0))[1] for r in rows]
        stds = [0.0 if math.isnan(s) else s for s in stds]
        x = range(len(rows))
        ax.bar(x, [0.0 if math.isnan(v) else v for v in means], yerr=stds, capsize=4,
               color=[colors[i % len(colors)] for i in x])
        ax.set_xticks(list(x))
        ax.set_xticklabels([r.group for r in rows], rotation=20, ha="right", fontsize=8)
        ax.set_title(m, fontsize=9)
        for i, (v, s) in enumerate(zip(means, stds)):
            if not math.isnan(v):
                ax.text(i, v + s, f"{v:.1f}", ha="center", va="bottom", fontsize=7)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.suptitle("mean ± std over runs (percent)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fsio.save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def build_report(run_dirs: list[str | Path], out_dir: str | Path,
                 group_by: list[str] | None = None, metrics: list[str] | None = None) -> dict:
    """Gather runs, aggregate, and write ``report.{md,csv,json,png}`` into ``out_dir``."""
    group_by = group_by or ["adapter.method"]
    runs = [read_run(d, group_by) for d in run_dirs]
    names = select_metrics(runs, metrics)
    rows = aggregate(runs, names)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = to_markdown(rows, names)
    fsio.write_text(out / "report.md", md)
    to_csv(rows, names, out / "report.csv")
    plot(rows, names, out / "report.png")
    data = {"group_by": group_by, "metrics": names, "std": "sample (n - 1)", "groups": [
        {"group": r.group, "runs": [str(x.path) for x in r.runs], "seeds": r.seeds,
         "trainable_pct": r.trainable_pct, "train_minutes": list(r.train_minutes),
         "metrics": {m: {"mean": v[0], "std": v[1], "n": v[2]} for m, v in r.metrics.items()}}
        for r in rows]}
    fsio.write_json(out / "report.json", _no_nan(data))
    return {"markdown": md, "rows": rows, "metrics": names, "out_dir": out}


def _no_nan(o):
    """JSON has no NaN: an undefined std (one run) becomes null."""
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, dict):
        return {k: _no_nan(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_no_nan(v) for v in o]
    return o


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparsedoc report", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders (or folders of eval task JSONs)")
    p.add_argument("--out", default="runs/report", help="output folder (default: %(default)s)")
    p.add_argument("--group-by", default="adapter.method",
                   help="comma-separated config keys that name a group (default: %(default)s)")
    p.add_argument("--metrics", default="",
                   help="comma-separated patterns of task/metric, e.g. 'mts_dialog/rouge*'")
    args = p.parse_args(argv)
    try:
        res = build_report(args.runs, args.out, args.group_by.split(","),
                           [m for m in args.metrics.split(",") if m] or None)
    except FileNotFoundError as e:
        print(f"error: {e}")
        return 2
    print(res["markdown"])
    print(f"report: {Path(args.out).resolve()}/report.{{md,csv,json,png}}")
    return 0
