"""SumPubMed: a full PubMed/BMC article -> its abstract (or the shorter abstract).

Release format: plain UTF-8 text files matched by number across three folders:
``text/text_N.txt`` (article), ``abstract/abstract_N.txt`` (abstract with BACKGROUND / RESULTS /
CONCLUSIONS headings) and ``shorter_abstract/abst_N.txt``. ``--target`` picks the summary
(``abstract`` by default). An article without its target file, a target without its article,
or an empty / undecodable file is a reported skip. SumPubMed ships no splits: the seeded split
is keyed by article number.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from sparsedoc.prep.common import Collected, ConvertError, Context, Row, add_split_arguments, \
    cli_main, find_files, load_hf, run_conversion, seeded_split
from sparsedoc.prep.records import RowError, chat_record, make_id, require_text
from sparsedoc.prep.registry import get_info

INFO = get_info("sumpubmed")
TARGETS = {"abstract": ("abstract", "abstract_"), "shorter_abstract": ("shorter_abstract", "abst_")}
PROMPTS = {"abstract": "Write the abstract of this biomedical article.",
           "shorter_abstract": "Summarize this biomedical article in a few sentences."}


def _numbered(ctx: Context, folder: Path, prefix: str) -> dict[str, Path]:
    files = {}
    for path in sorted(folder.glob(f"{prefix}*.txt")) if folder.is_dir() else []:
        m = re.fullmatch(rf"{prefix}(\d+)", path.stem)
        if m:
            files[m.group(1)] = path
        else:
            ctx.ignore(path, f"name is not {prefix}<N>.txt")
    return files


def _read_files(ctx: Context, target: str, fractions: dict[str, float]) -> Collected:
    root = ctx.src
    find_files(root, (".txt",))  # a clear error when there is nothing to read
    folder, prefix = TARGETS[target]
    texts = _numbered(ctx, root / "text", "text_")
    targets = _numbered(ctx, root / folder, prefix)
    if not texts:
        raise ConvertError(f"{root}: no text/text_N.txt article files found")
    rows: list[Row] = []
    for n in sorted(set(texts) | set(targets), key=int):
        where = ctx.rel(texts.get(n) or targets[n])
        if n not in targets:
            err = RowError(target, f"no {folder}/{prefix}{n}.txt for this article",
                           "missing_field")
            rows.append(Row(where, index=int(n), key=n, file="text", error=err))
        elif n not in texts:
            err = RowError("text", f"no text/text_{n}.txt for this {target}", "missing_field")
            rows.append(Row(where, index=int(n), key=n, file="text", error=err))
        else:
            try:  # one file per article: an unreadable one is a skipped row, not a failed run
                data = {"text": ctx.read_text(texts[n])[0],
                        "summary": ctx.read_text(targets[n])[0]}
            except ConvertError as e:
                err = RowError(None, str(e), "unreadable_file")
                rows.append(Row(where, index=int(n), key=n, file="text", error=err))
                continue
            rows.append(Row(where, data, index=int(n), key=n, file="text"))
    splits = seeded_split(rows, lambda r: r.key, ctx.seed, fractions)
    return Collected(splits, {"target": target, **{f"{k}_frac": v for k, v in fractions.items()}})


def _read_hf(ctx: Context, target: str, fractions: dict[str, float]) -> Collected:
    splits = load_hf(ctx.hf)
    for rows in splits.values():
        for row in rows:
            row.key = str(row.data.get("id", row.index))
            row.data = {"text": row.data.get("text"), "summary": row.data.get(target)}
    if list(splits) == ["train"]:  # a hub copy without splits gets the seeded one
        splits = seeded_split(splits["train"], lambda r: r.key, ctx.seed, fractions)
    return Collected(splits, {"target": target})


def _build(row: Row, split: str, target: str) -> dict:
    article = require_text(row.data.get("text"), "text")
    summary = require_text(row.data.get("summary"), target)
    return chat_record(make_id(INFO.name, split, row.key),
                       [(f"{PROMPTS[target]}\n\n{article}", summary)], source=INFO.name,
                       task=INFO.task, lang="en", article=int(row.key) if row.key.isdigit()
                       else row.key, target=target)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--target", choices=tuple(TARGETS), default="abstract",
                   help="which summary is the answer (default: abstract)")
    add_split_arguments(p)


def convert(src: Path | None, out: Path, *, strict: bool = False, seed: int = 0,
            hf: str | None = None, encoding: str | None = None, target: str = "abstract",
            val_frac: float = 0.1, test_frac: float = 0.1) -> dict:
    """Convert SumPubMed (the folder holding ``text/`` and ``abstract/``); return the report."""
    if target not in TARGETS:
        raise ConvertError(f"target must be one of {list(TARGETS)}, got {target!r}")
    fractions = {"test": test_frac, "validation": val_frac}
    return run_conversion(INFO, src=src, out=out, strict=strict, seed=seed, hf=hf,
                          encoding=encoding,
                          read_files=lambda ctx: _read_files(ctx, target, fractions),
                          read_hf=lambda ctx: _read_hf(ctx, target, fractions),
                          build=lambda row, split: _build(row, split, target))


def main(argv: list[str] | None = None) -> int:
    return cli_main(INFO, convert, argv, add_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
