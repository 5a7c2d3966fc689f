"""``evaluate(cfg)``: load one model, score every task, write ``<eval dir>/<task>.json``, log.

Each task file holds the data identity (path, split, sha256, items available and scored), the
model identity (``sparsedoc.artifacts.Loaded``), the settings, a ``summary`` per scorer, the flat
``metrics`` the comparison report reads, the time taken, and every item's scores (its reference
and the model's text too with ``logging.log_samples``). Metrics (numbers only, never record
text) also go to ``<eval dir>/metrics.jsonl`` and W&B. The resume cache (``.cache/``) keeps the
model's outputs, never the prompts or references; ``resume=false`` writes none.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict
from pathlib import Path

from sparsedoc import fsio
from sparsedoc.artifacts import EVAL_DIR, RUN_CONFIG, Loaded
from sparsedoc.config import EvalCfg
from sparsedoc.eval.cache import PredictionCache, cache_key
from sparsedoc.eval.tasks import Task, expand_tasks, item_label, load_task
from sparsedoc.loader import load_trained
from sparsedoc.methods import method_class
from sparsedoc.resources import resolve_path

log = logging.getLogger("sparsedoc")

# per-item text: written into <task>.json only with logging.log_samples (records are medical)
TEXT_KEYS = ("reference", "prediction", "output")
# settings that change predictions, per scorer (the cache key and the JSON record them)
_PROMPT_KEYS = ("prompt_format", "system_prompt", "num_fewshot", "max_prompt_tokens", "dtype")


def output_dir(cfg: EvalCfg, loaded: Loaded) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir)
    if loaded.kind == "run":
        return Path(loaded.run_dir) / EVAL_DIR
    if loaded.kind == "checkpoint":
        return Path(loaded.run_dir) / EVAL_DIR / Path(loaded.checkpoint).name
    return Path("runs") / EVAL_DIR / loaded.name


def _settings(cfg: EvalCfg, scorer: str) -> dict:
    s = {k: getattr(cfg, k) for k in _PROMPT_KEYS}
    if scorer != "loglik":
        s["max_new_tokens"] = cfg.max_new_tokens if scorer == "text" else cfg.mcq_max_new_tokens
        s["greedy"] = cfg.greedy
    return s


def _cache(cfg: EvalCfg, out: Path, task: Task, scorer: str, loaded: Loaded) -> PredictionCache:
    if not cfg.resume:
        return PredictionCache(None)
    key = cache_key(model=loaded.fingerprint, model_path=loaded.path, data=task.sha256,
                    fewshot=str(task.fewshot_path), scorer=scorer, **_settings(cfg, scorer))
    return PredictionCache(out / ".cache" / f"{task.name}.{scorer}.{key}.jsonl")


def run_task(model, tokenizer, loaded: Loaded, task: Task, cfg: EvalCfg, out: Path) -> dict:
    """Score one task; returns the JSON-able result (also written to ``out/<task>.json``)."""
    from sparsedoc.eval import generation, mcq

    t0 = time.perf_counter()
    result = {"task": task.name, "kind": task.kind,
              "data": {"path": str(task.path), "split": task.split, "sha256": task.sha256,
                       "n_available": task.n_available, "n_scored": len(task.items),
                       "limit": cfg.limit, "seed": cfg.seed,
                       "fewshot_path": str(task.fewshot_path) if task.fewshot_path else None},
              "model": loaded.record(), "summary": {}, "metrics": {}, "timing": {}, "notes": []}
    samples = cfg.logging.log_samples  # text (references, model outputs) only when asked
    items_out = [{"id": it.id, "label": item_label(it)} for it in task.items]
    if task.kind == "mcq":
        scorers = ["loglik", "generate"] if cfg.mcq_scorer == "both" else [cfg.mcq_scorer]
        for it, row in zip(task.items, items_out):
            row["gold"] = it.answer
        for scorer in scorers:
            ts = time.perf_counter()
            preds, stats = mcq.score_mcq(model, tokenizer, task.items, scorer, cfg, task.fewshot,
                                         _cache(cfg, out, task, scorer, loaded), progress=True)
            summary = mcq.summarize(task.items, preds, scorer)
            summary.update(stats, settings=_settings(cfg, scorer))
            result["summary"][scorer] = summary
            result["timing"][scorer] = time.perf_counter() - ts
            result["metrics"][f"acc_{scorer}"] = summary["accuracy"]
            if scorer == "generate":
                result["metrics"]["unparsed_generate"] = summary["unparsed"]
            for row, p in zip(items_out, preds):
                row[scorer] = p if samples else {k: v for k, v in p.items() if k not in TEXT_KEYS}
        if any(len(it.answer) > 1 for it in task.items) and "loglik" in scorers:
            result["notes"].append(f"{sum(len(it.answer) > 1 for it in task.items)} "
                                   f"multi-answer items: the loglik scorer picks one letter "
                                   f"and scores them wrong")
    else:
        if cfg.num_fewshot:
            result["notes"].append("num_fewshot applies to multiple choice only; generation "
                                   "tasks are zero-shot")
        ts = time.perf_counter()
        preds, stats = generation.score_generation(
            model, tokenizer, task.items, cfg, _cache(cfg, out, task, "text", loaded),
            progress=True)
        summary = generation.summarize(task.items, preds, cfg.bootstrap_samples, cfg.seed)
        summary.update(shortened_prompts=stats["shortened_prompts"],
                       truncated_prompts=stats["truncated_prompts"], cached=stats["cached"],
                       settings=_settings(cfg, "text"), bertscore=stats["bertscore"],
                       rouge={"use_stemmer": True, "zh_tokenization": "characters",
                              "score": "F1"})
        result["notes"] += stats["notes"]
        result["summary"]["text"] = summary
        result["timing"]["text"] = time.perf_counter() - ts
        for k in generation.ROUGE_TYPES + ("bertscore_f1",):
            if k in summary:
                result["metrics"][k] = summary[k]
        for it, row, p in zip(task.items, items_out, preds):
            if samples:
                row.update(reference=it.reference, **p)
            else:
                row.update({k: v for k, v in p.items() if k not in TEXT_KEYS})
    result["seconds"] = time.perf_counter() - t0
    result["items"] = items_out
    write_json(out / f"{task.name}.json", result)
    return result


def write_json(path: Path, obj: dict) -> None:
    fsio.write_json(path, obj, indent=1, default=_json_default)


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _routing(model, tokenizer, loaded: Loaded, task_records: dict[str, list[dict]], cfg: EvalCfg,
             out: Path, logger, step: int) -> dict:
    """Routing analysis of a LoRA-MoE model on each labelled task and on its routing files."""
    from sparsedoc.config import load_config
    from sparsedoc.data.schema import read_jsonl
    from sparsedoc.eval.routing import analyze_routing

    sets = dict(task_records)
    files = list(cfg.routing_files)
    max_len = 512
    if loaded.kind in ("run", "checkpoint"):
        run_cfg = load_config(Path(loaded.checkpoint) / RUN_CONFIG)
        max_len = max(run_cfg.data.max_seq_len, 512)  # routing needs no target token
        if not files:
            files = run_cfg.data.eval_files
    for f in files:
        p = resolve_path(f)
        if p.is_file():
            sets[f"file-{p.stem}"] = read_jsonl(p)
        else:
            log.warning("routing: %s not found, skipped", f)
    found = {}
    for name, records in sets.items():
        res = analyze_routing(model, tokenizer, records[:cfg.routing_max_records],
                              out / "routing" / name, max_seq_len=max_len,
                              batch_size=cfg.batch_size)
        if res is None:
            log.info("routing: %s has fewer than two labels, skipped", name)
            continue
        found[name] = {k: res[k] for k in ("labels", "records", "mi_bits_mean", "mi_bits_max",
                                           "mi_fraction_mean", "label_entropy_bits",
                                           "load_entropy_bits_mean", "load_entropy_max_bits",
                                           "busiest_share_mean", "busiest_share_max",
                                           "balanced_busiest_share")}
        logger.log({f"routing/{name}/{k}": res[k]
                    for k in ("mi_bits_mean", "mi_fraction_mean", "load_entropy_bits_mean",
                              "busiest_share_mean", "busiest_share_max")}, step)
        log.info("routing %s (%d records, %d labels): I(label; top-1 expert) %.4f bits = %.3f of "
                 "H(label) %.3f; load entropy %.3f of %.3f bits; busiest expert share %.3f "
                 "(mean), %.3f (max), balanced %.3f", name, res["records"], len(res["labels"]),
                 res["mi_bits_mean"], res["mi_fraction_mean"], res["label_entropy_bits"],
                 res["load_entropy_bits_mean"], res["load_entropy_max_bits"],
                 res["busiest_share_mean"], res["busiest_share_max"],
                 res["balanced_busiest_share"])
        for img in res["images"]:
            logger.log_image(f"routing/{name}/{Path(img).stem}", img, step)
    write_json(out / "routing" / "summary.json", found)
    return found


def _make_logger(cfg: EvalCfg, out: Path, loaded: Loaded):
    from sparsedoc.config import replace
    from sparsedoc.logging import JsonlLogger, MultiLogger, WandbLogger

    loggers = [JsonlLogger(out / "metrics.jsonl")]
    if cfg.logging.wandb and cfg.logging.mode != "disabled":
        lcfg = replace(cfg.logging, run_name=cfg.logging.run_name or f"eval-{loaded.name}")
        loggers.append(WandbLogger(lcfg, out, {"eval": asdict(cfg), "model": loaded.record()}))
    return MultiLogger(loggers)


def _with_training_source_prefix(cfg: EvalCfg, model, loaded: Loaded) -> EvalCfg:
    """An encoder-decoder run is evaluated with the instruction it was trained with
    (``data.source_prefix``) unless ``source_prefix`` is given: a T5 asked without its
    ``summarize: `` answers another question."""
    from sparsedoc.config import load_config, replace
    from sparsedoc.models.load import is_encoder_decoder

    if cfg.source_prefix or not is_encoder_decoder(model) or loaded.kind not in ("run", "checkpoint"):
        return cfg
    prefix = load_config(Path(loaded.checkpoint) / RUN_CONFIG).data.source_prefix
    if prefix:
        log.info("source_prefix=%r: the run's data.source_prefix", prefix)
    return replace(cfg, source_prefix=prefix)


def evaluate(cfg: EvalCfg) -> dict[str, dict]:
    """Evaluate ``cfg.model`` on ``cfg.tasks``; returns ``{task: result}`` and prints a table."""
    tasks = [load_task(t, cfg.data_root, cfg.split, cfg.limit, cfg.seed, cfg.num_fewshot)
             for t in expand_tasks(cfg.tasks)]  # all data errors surface before model loading
    model, tokenizer, loaded = load_trained(cfg.model, cfg.dtype, cfg.device, cfg.trust_remote_code)
    cfg = _with_training_source_prefix(cfg, model, loaded)
    out = output_dir(cfg, loaded)
    out.mkdir(parents=True, exist_ok=True)
    logger = _make_logger(cfg, out, loaded)
    step = loaded.step or 0
    results: dict[str, dict] = {}
    try:
        for task in tasks:
            log.info("task %s: %d of %d items (%s, %s)", task.name, len(task.items),
                     task.n_available, task.kind, task.path)
            res = run_task(model, tokenizer, loaded, task, cfg, out)
            results[task.name] = res
            logger.log({f"eval/{task.name}/{k}": v for k, v in res["metrics"].items()}
                       | {f"eval/{task.name}/seconds": res["seconds"]}, step)
            for note in res["notes"]:
                log.info("%s: %s", task.name, note)
        if cfg.routing and loaded.method != "base" and method_class(loaded.method).routes:
            records = {t.name: _unique_records(t) for t in tasks}
            routing = _routing(model, tokenizer, loaded, records, cfg, out, logger, step)
            for name, summary in routing.items():
                if name in results:
                    results[name]["routing"] = summary
                    write_json(out / f"{name}.json", results[name])
    finally:
        logger.close()
    print(format_table(results))
    print(f"results: {out.resolve()}")
    return results


def _unique_records(task: Task) -> list[dict]:
    seen, out = set(), []
    for it in task.items:
        if it.record is not None and it.record["id"] not in seen:
            seen.add(it.record["id"])
            out.append(it.record)
    return out


def _fmt(x: float) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def format_table(results: dict[str, dict]) -> str:
    """A plain-text table: one row per task and metric, with its 95% interval and time."""
    rows = [("task", "kind", "n", "metric", "value", "95% CI", "seconds")]
    for name, r in results.items():
        for scorer, s in r["summary"].items():
            if r["kind"] == "mcq":
                extra = f" (unparsed {s['unparsed']})" if scorer == "generate" else ""
                rows.append((name, r["kind"], str(s["n"]), f"acc_{scorer}{extra}",
                             _fmt(s["accuracy"]),
                             f"[{_fmt(s['ci95'][0])}, {_fmt(s['ci95'][1])}]",
                             f"{r['timing'][scorer]:.1f}"))
            else:
                for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "bertscore_f1"):
                    if k in s:
                        ci = s[f"{k}_ci95"]
                        rows.append((name, r["kind"], str(s.get(f"{k}_n", s["n"])), k,
                                     _fmt(s[k]), f"[{_fmt(ci[0])}, {_fmt(ci[1])}]",
                                     f"{r['timing'][scorer]:.1f}"))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)) for row in rows)
