"""The ``README.md`` dataset card written beside every converted dataset.

A card answers, without opening the JSONL: where the data came from, whether it may be used
commercially, how many records each split has (and what was skipped, why), what the labels are,
and what one record looks like once rendered.
"""

from __future__ import annotations

from sparsedoc.data.schema import record_kind


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit].rstrip() + " …"


def render_example(record: dict, limit: int = 600) -> str:
    """One record as a reader (or a model) would see it; long texts are clipped."""
    if record_kind(record) == "mcq":
        opts = "\n".join(f"{k}. {v}" for k, v in record["options"].items())
        text = f"{record['question']}\n{opts}\n\nanswer: {record['answer']}"
        if record.get("explanation"):
            text += f"\nexplanation: {_clip(record['explanation'], limit // 2)}"
        return _clip(text, 2 * limit)
    return "\n\n".join(f"[{m['role']}]\n{_clip(m['content'], limit)}" for m in record["messages"])


def _total(report: dict, key: str) -> dict[str, int]:
    """A per-split counter of the report summed over splits."""
    total: dict[str, int] = {}
    for s in report["splits"].values():
        for k, n in s.get(key, {}).items():
            total[k] = total.get(k, 0) + n
    return total


def render_card(info, report: dict, example: dict | None) -> str:
    """Markdown card from a conversion report and one converted record."""
    lines = [f"# {report['title']}", ""]
    if report["non_commercial"]:
        lines += ["> **NON-COMMERCIAL**: this dataset may only be used for research; do not "
                  "ship models trained on it in a commercial product.", ""]
    origin = f"Hugging Face hub `{report['hf']}`" if report["hf"] else f"`{report['src']}`"
    lines += [f"- source: {info.homepage}",
              f"- converted from: {origin} by `sparsedoc.prep.{info.module}` "
              f"(seed {report['seed']}, strict {report['strict']})",
              f"- license: {report['license']}",
              f"- task: {report['task']}; language: {report['lang']}; "
              f"`meta.label`: {info.label or 'none'}", ""]
    lines += ["| split | in | out | skipped | file |", "|---|---:|---:|---:|---|"]
    for name, s in report["splits"].items():
        path = report.get("outputs", {}).get(name, {}).get("path", f"{name}.jsonl")
        lines.append(f"| {name} | {s['in']} | {s['out']} | {s['skipped']} | `{path}` |")
    lines.append("")
    skip_kinds = _total(report, "skip_kinds")
    if skip_kinds:
        lines += ["Skipped rows by reason (each one is listed in `report.json`): "
                  + ", ".join(f"{k} {n}" for k, n in sorted(skip_kinds.items())), ""]
    labels = _total(report, "labels")
    top = sorted(labels.items(), key=lambda kv: -kv[1])[:12]
    lines += ["Labels (all splits): " + ", ".join(f"{k} {n}" for k, n in top)
              + (f", … ({len(labels) - 12} more)" if len(labels) > 12 else ""), ""]
    answers = _total(report, "answers")
    if answers and len(answers) <= 12:
        lines += ["Answers (all splits): " + ", ".join(f"{k} {n}" for k, n in answers.items()), ""]
    dups = {name: s["duplicates"] for name, s in report["splits"].items() if s.get("duplicates")}
    leaks = {name: s["overlap"] for name, s in report["splits"].items() if s.get("overlap")}
    if dups:
        lines += ["Repeated records kept (same normalised text): "
                  + ", ".join(f"{k} {n}" for k, n in dups.items()), ""]
    if leaks:
        lines += [f"**Records shared between splits**: {leaks}", ""]
    if report["warnings"]:
        lines += ["Notes:", *[f"- {w}" for w in report["warnings"]], ""]
    if example is not None:
        lines += [f"Example (`{example['id']}`):", "", "```text", render_example(example), "```",
                  ""]
    return "\n".join(lines)
