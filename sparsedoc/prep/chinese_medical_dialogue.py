"""Toyhom's Chinese medical dialogue data: patient question -> doctor answer, by department.

Release format: ``Data_数据/<Dept>/<dept>….csv`` and the sample ``样例_内科5000-6000.csv``:
**GB18030/GBK** CSV (not UTF-8; the encoding is detected and reported), LF, header
``department,title,ask,answer`` (the README calls ``ask`` ``question``; both are accepted).
Some answers are quoted multi-line fields. A few ``ask`` cells are just ``无`` ("none"): the
title is the question then. The source has exact duplicates: they are kept (and counted in the
report as ``duplicates``) but always fall in the same split, because the seeded split is keyed
by the normalised question. ``meta.label`` is the department.
"""

from __future__ import annotations

from pathlib import Path

from sparsedoc.prep.common import Collected, Context, Row, add_split_arguments, cli_main, find_files, \
    load_hf, run_conversion, seeded_split
from sparsedoc.prep.records import chat_record, clean_text, make_id, normalize_for_dedup, \
    require_text
from sparsedoc.prep.registry import get_info

INFO = get_info("chinese_medical_dialogue")
REQUIRED = ("ask", "answer")
ALIASES = {"question": "ask"}
EMPTY_ASK = {"", "无"}


def _question(d: dict) -> str:
    ask, title = clean_text(d.get("ask")), clean_text(d.get("title"))
    return title if ask in EMPTY_ASK else ask


def _split_key(row: Row) -> str:
    return normalize_for_dedup(_question(row.data))


def _read_files(ctx: Context, fractions: dict[str, float]) -> Collected:
    rows: list[Row] = []
    for path in find_files(ctx.src, (".csv",)):
        rows += ctx.read_csv(path, REQUIRED, ALIASES)
    splits = seeded_split(rows, _split_key, ctx.seed, fractions)
    return Collected(splits, {f"{k}_frac": v for k, v in fractions.items()})


def _read_hf(ctx: Context, fractions: dict[str, float]) -> Collected:
    rows = [r for rs in load_hf(ctx.hf).values() for r in rs]
    for row in rows:
        row.data = {ALIASES.get(k, k): v for k, v in row.data.items()}
    return Collected(seeded_split(rows, _split_key, ctx.seed, fractions))


def _build(row: Row, split: str) -> dict:
    d = row.data
    question = require_text(_question(d), "ask")
    answer = require_text(d.get("answer"), "answer")
    return chat_record(make_id(INFO.name, split, row.tag, row.index), [(question, answer)],
                       source=INFO.name, task=INFO.task, lang="zh",
                       label=clean_text(d.get("department")) or None,
                       title=clean_text(d.get("title")))


def convert(src: Path | None, out: Path, *, strict: bool = False, seed: int = 0,
            hf: str | None = None, encoding: str | None = None, val_frac: float = 0.1,
            test_frac: float = 0.1) -> dict:
    """Convert Toyhom CSVs (a file or ``Data_数据/``) or a hub copy; return the report."""
    fractions = {"test": test_frac, "validation": val_frac}
    return run_conversion(INFO, src=src, out=out, strict=strict, seed=seed, hf=hf,
                          encoding=encoding, read_files=lambda ctx: _read_files(ctx, fractions),
                          read_hf=lambda ctx: _read_hf(ctx, fractions), build=_build)


def main(argv: list[str] | None = None) -> int:
    return cli_main(INFO, convert, argv, add_split_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
