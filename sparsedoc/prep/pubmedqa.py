"""PubMedQA PQA-L (expert-labelled): abstract + question -> yes/no/maybe with the conclusion.

Release format: ``data/ori_pqal.json``, one JSON object keyed by PMID (not a list), values with
``QUESTION, CONTEXTS, LABELS, MESHES, YEAR, final_decision, LONG_ANSWER``; the official test set
is the 500 PMIDs of ``data/test_ground_truth.json`` (``{pmid: "yes"|"no"|"maybe"}``).

Splits: PMIDs in the ground truth -> ``test`` (their label must agree with ``final_decision``);
the others are the official 500-item training pool, which PubMedQA itself only cuts into 10 CV
folds. Those folds depend on the order of the full 1,000-item file, so the pool is split here
with the seeded split keyed by PMID and stratified by label, as PubMedQA's folds are
(``--val-frac``, default 0.1, the size of one fold). The ground truth is looked up beside
``ori_pqal.json`` or given with ``--test-labels``; without it every item goes to the pool, with
a warning in the report.

Records: chat, user = labelled abstract sections + question, assistant = ``"Answer: <label>"``
followed by the long answer; ``meta.answer`` holds the label for scoring.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparsedoc.prep.common import Collected, ConvertError, Context, Row, cli_main, find_files, \
    load_hf, run_conversion, seeded_split
from sparsedoc.prep.records import RowError, chat_record, clean_text, make_id, require_text
from sparsedoc.prep.registry import get_info

INFO = get_info("pubmedqa")
DECISIONS = ("yes", "no", "maybe")
INSTRUCTION = "Answer the question with yes, no or maybe, then give the conclusion."


def _ground_truth(ctx: Context, path: Path | None) -> dict[str, str] | None:
    if path is None:
        return None
    text, info = ctx.read_text(path)
    info.format = "json-object-by-id"
    try:
        truth = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConvertError(f"{info.path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(truth, dict) or any(v not in DECISIONS for v in truth.values()):
        raise ConvertError(f"{info.path}: expected an object {{pmid: yes|no|maybe}}")
    info.records = len(truth)
    return {str(k): v for k, v in truth.items()}


def _split(ctx: Context, rows: list[Row], truth: dict[str, str] | None,
           val_frac: float) -> Collected:
    if truth is None:
        ctx.warnings.append("no test_ground_truth.json found or given: every item went to the "
                            "train/validation pool; if the input holds the official test PMIDs, "
                            "pass --test-labels")
        truth = {}
    test = [r for r in rows if r.key in truth]
    for row in test:
        row.data = {**row.data, "_truth": truth[row.key]} if isinstance(row.data, dict) else None
    absent = len(set(truth) - {r.key for r in rows})
    if absent:
        ctx.warnings.append(f"{absent} PMIDs of the test ground truth are not in the input; "
                            f"the test split is incomplete")
    pool = [r for r in rows if r.key not in truth]
    splits = seeded_split(pool, lambda r: r.key, ctx.seed, {"validation": val_frac},
                          stratify=lambda r: str(r.data.get("final_decision")))
    if test:
        splits["test"] = test
    return Collected(splits, {"val_frac": val_frac})


def _read_files(ctx: Context, test_labels: Path | None, val_frac: float) -> Collected:
    files = find_files(ctx.src, (".json",))
    if test_labels is None:
        test_labels = next((p for p in files if p.name == "test_ground_truth.json"), None)
        if test_labels is None and ctx.src.is_file():
            beside = ctx.src.parent / "test_ground_truth.json"
            test_labels = beside if beside.is_file() else None
    data_files = [p for p in files if p.name != "test_ground_truth.json"]
    if any(p.name == "ori_pqal.json" for p in data_files):  # the release beside derived files
        for p in data_files:
            if p.name != "ori_pqal.json":
                ctx.ignore(p, "not ori_pqal.json (derived split files and PQA-A/U are not "
                              "converted)")
        data_files = [p for p in data_files if p.name == "ori_pqal.json"]
    rows: list[Row] = []
    for path in data_files:
        found = ctx.read_records(path)
        if not all(r.key for r in found):
            ctx.ignore(path, "not an object keyed by PMID (ori_pqal.json format)")
            continue
        rows += found
    if not rows:
        raise ConvertError(f"{ctx.src}: no PQA-L file (an object keyed by PMID) found")
    collected = _split(ctx, rows, _ground_truth(ctx, test_labels), val_frac)
    collected.options["test_labels"] = None if test_labels is None else ctx.rel(test_labels)
    return collected


def _from_hub(ex: dict) -> dict:
    """Hub ``pqa_labeled`` rows -> the ori_pqal.json value layout."""
    ctx = ex.get("context") or {}
    return {"QUESTION": ex.get("question"), "CONTEXTS": ctx.get("contexts"),
            "LABELS": ctx.get("labels"), "MESHES": ctx.get("meshes"), "YEAR": ex.get("year"),
            "final_decision": ex.get("final_decision"), "LONG_ANSWER": ex.get("long_answer")}


def _read_hf(ctx: Context, test_labels: Path | None, val_frac: float) -> Collected:
    rows = [r for rs in load_hf(ctx.hf, "pqa_labeled").values() for r in rs]
    for row in rows:
        row.key = str(row.data.get("pubid"))
        row.data = _from_hub(row.data)
    return _split(ctx, rows, _ground_truth(ctx, test_labels), val_frac)


def _build(row: Row, split: str) -> dict:
    d = row.data
    if not isinstance(d, dict):
        raise RowError(None, f"expected a JSON object, got {type(d).__name__}", "malformed_row")
    decision = clean_text(d.get("final_decision")).lower()
    if decision not in DECISIONS:
        raise RowError("final_decision", f"expected yes/no/maybe, got {decision!r}", "bad_answer")
    truth = d.get("_truth")
    if truth is not None and truth != decision:
        raise RowError("final_decision", f"{decision!r} disagrees with test_ground_truth.json "
                                         f"{truth!r}", "label_mismatch")
    contexts, labels = d.get("CONTEXTS") or [], d.get("LABELS") or []
    if not isinstance(contexts, list) or not contexts:
        raise RowError("CONTEXTS", "expected a non-empty list", "missing_field")
    if len(labels) != len(contexts):
        labels = [""] * len(contexts)
    body = "\n".join(f"{lab}: {clean_text(c)}" if lab else clean_text(c)
                     for lab, c in zip(labels, contexts))
    question = require_text(d.get("QUESTION"), "QUESTION")
    user = f"{body}\n\nQuestion: {question}\n{INSTRUCTION}"
    long_answer = require_text(d.get("LONG_ANSWER"), "LONG_ANSWER")
    return chat_record(make_id(INFO.name, split, row.key), [(user, f"Answer: {decision}\n"
                                                                   f"{long_answer}")],
                       source=INFO.name, task=INFO.task, lang="en", answer=decision,
                       pmid=row.key, year=clean_text(d.get("YEAR")))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--test-labels", type=Path, default=None,
                   help="test_ground_truth.json (default: looked up beside the data file)")
    p.add_argument("--val-frac", type=float, default=0.1,
                   help="share of the training pool held out as validation (default 0.1)")


def convert(src: Path | None, out: Path, *, strict: bool = False, seed: int = 0,
            hf: str | None = None, encoding: str | None = None, test_labels: Path | None = None,
            val_frac: float = 0.1) -> dict:
    """Convert PQA-L (``ori_pqal.json`` or its folder, or the hub); return the report."""
    return run_conversion(INFO, src=src, out=out, strict=strict, seed=seed, hf=hf,
                          encoding=encoding,
                          read_files=lambda ctx: _read_files(ctx, test_labels, val_frac),
                          read_hf=lambda ctx: _read_hf(ctx, test_labels, val_frac), build=_build)


def main(argv: list[str] | None = None) -> int:
    return cli_main(INFO, convert, argv, add_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
