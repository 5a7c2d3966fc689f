"""CMMLU, medical and clinical subjects -> MCQ records.

Release format: ``data/dev/<subject>.csv`` (5 few-shot items) and ``data/test/<subject>.csv``,
UTF-8, LF; columns ``,Question,A,B,C,D,Answer`` where the empty first header cell is the pandas
row index (kept as the record id: it continues across the original files, so ids stay stable).
Every CMMLU subject that is medical or clinical is converted by name, whether or not its file is
present; other subjects' files are listed as ignored. Hub: ``haonan-li/cmmlu``, one config per
subject, splits ``dev`` / ``test``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparsedoc.prep.common import Collected, ConvertError, Context, Row, cli_main, find_files, \
    load_hf, run_conversion, split_from_name
from sparsedoc.prep.records import check_options, clean_text, make_id, mcq_record, parse_answer
from sparsedoc.prep.registry import get_info

INFO = get_info("cmmlu_med")

# The medical / clinical subjects of CMMLU's 67, with CMMLU's own Chinese names.
MEDICAL_SUBJECTS = {
    "anatomy": "解剖学",
    "clinical_knowledge": "临床知识",
    "college_medical_statistics": "大学医学统计",
    "college_medicine": "大学医学",
    "genetics": "遗传学",
    "nutrition": "营养学",
    "professional_medicine": "专业医学",
    "traditional_chinese_medicine": "中医中药",
    "virology": "病毒学",
}
REQUIRED = ("Question", "A", "B", "C", "D", "Answer")


def _subjects(names: list[str] | None) -> list[str]:
    chosen = list(MEDICAL_SUBJECTS) if not names else names
    unknown = [s for s in chosen if s not in MEDICAL_SUBJECTS]
    if unknown:
        raise ConvertError(f"unknown CMMLU medical subject(s) {unknown}; "
                           f"known: {', '.join(MEDICAL_SUBJECTS)}")
    return chosen


def _read_files(ctx: Context, subjects: list[str]) -> Collected:
    splits: dict[str, list[Row]] = {}
    found: dict[str, set[str]] = {s: set() for s in subjects}
    for path in find_files(ctx.src, (".csv",)):
        split = split_from_name(path.parent.name) or split_from_name(path.stem)
        if path.stem not in subjects:
            ctx.ignore(path, "not one of the selected medical subjects")
            continue
        if split is None:
            ctx.ignore(path, "cannot tell the split from the folder name (expected dev/ or test/)")
            continue
        rows = ctx.read_csv(path, REQUIRED)
        for row in rows:
            row.key = path.stem
        splits.setdefault(split, []).extend(rows)
        found[path.stem].add(split)
    missing = [s for s, sp in found.items() if not sp]
    if missing:
        ctx.warnings.append(f"no file for subject(s) {', '.join(missing)} under {ctx.src}")
    return Collected(splits, {"subjects": subjects})


def _read_hf(ctx: Context, subjects: list[str]) -> Collected:
    splits: dict[str, list[Row]] = {}
    for subject in subjects:
        for split, rows in load_hf(ctx.hf, subject).items():
            for row in rows:
                row.key = subject
            splits.setdefault(split, []).extend(rows)
    return Collected(splits, {"subjects": subjects})


def _build(row: Row, split: str) -> dict:
    d, subject = row.data, row.key
    options = check_options({k: d.get(k) for k in "ABCD"}, "A-D")
    index = clean_text(d.get("")) or row.index  # the pandas index column, when present
    return mcq_record(make_id(INFO.name, split, subject, index), d.get("Question"), options,
                      parse_answer(d.get("Answer"), options, "Answer"), source=INFO.name,
                      lang="zh", subject=subject, label=subject,
                      subject_zh=MEDICAL_SUBJECTS[subject], question_field="Question")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--subjects", type=lambda s: s.split(","), default=None,
                   help=f"comma-separated subset of: {', '.join(MEDICAL_SUBJECTS)} (default: all)")


def convert(src: Path | None, out: Path, *, strict: bool = False, seed: int = 0,
            hf: str | None = None, encoding: str | None = None,
            subjects: list[str] | None = None) -> dict:
    """Convert CMMLU's medical subjects (the ``data/`` folder or a hub id); return the report."""
    chosen = _subjects(subjects)
    return run_conversion(INFO, src=src, out=out, strict=strict, seed=seed, hf=hf,
                          encoding=encoding, read_files=lambda ctx: _read_files(ctx, chosen),
                          read_hf=lambda ctx: _read_hf(ctx, chosen), build=_build)


def main(argv: list[str] | None = None) -> int:
    return cli_main(INFO, convert, argv, add_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
