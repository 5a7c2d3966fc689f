"""BenTsao / Huatuo-Llama-Med-Chinese instruction data -> chat records (Alpaca style).

Release format: ``data/llama_data.json``, which is **JSON Lines** despite the extension (JSON
arrays are accepted too); keys ``instruction, input, output``. The user turn is the instruction,
followed by the input when there is one. No splits and no labels in the source: the seeded
split is keyed by the normalised instruction, so a repeated instruction never straddles train and
test.
"""

from __future__ import annotations

from pathlib import Path

from sparsedoc.prep.common import Collected, Context, Row, add_split_arguments, cli_main, find_files, \
    load_hf, run_conversion, seeded_split
from sparsedoc.prep.records import RowError, chat_record, clean_text, make_id, normalize_for_dedup, \
    require_text
from sparsedoc.prep.registry import get_info

INFO = get_info("bentsao")


def _split_key(row: Row) -> str:
    if not isinstance(row.data, dict):
        return row.where
    return normalize_for_dedup(f"{row.data.get('instruction')}\x1f{row.data.get('input')}")


def _read_files(ctx: Context, fractions: dict[str, float]) -> Collected:
    rows: list[Row] = []
    for path in find_files(ctx.src, (".json", ".jsonl")):
        rows += ctx.read_records(path)
    splits = seeded_split(rows, _split_key, ctx.seed, fractions)
    return Collected(splits, {f"{k}_frac": v for k, v in fractions.items()})


def _read_hf(ctx: Context, fractions: dict[str, float]) -> Collected:
    rows = [r for rs in load_hf(ctx.hf).values() for r in rs]
    return Collected(seeded_split(rows, _split_key, ctx.seed, fractions))


def _build(row: Row, split: str) -> dict:
    d = row.data
    if not isinstance(d, dict):
        raise RowError(None, f"expected a JSON object, got {type(d).__name__}", "malformed_row")
    instruction = require_text(d.get("instruction"), "instruction")
    extra = clean_text(d.get("input"))
    user = f"{instruction}\n{extra}" if extra else instruction
    return chat_record(make_id(INFO.name, split, row.tag, row.index),
                       [(user, require_text(d.get("output"), "output"))], source=INFO.name,
                       task=INFO.task, lang="zh")


def convert(src: Path | None, out: Path, *, strict: bool = False, seed: int = 0,
            hf: str | None = None, encoding: str | None = None, val_frac: float = 0.1,
            test_frac: float = 0.1) -> dict:
    """Convert BenTsao instruction files (a file or ``data/``) or a hub copy; return the report."""
    fractions = {"test": test_frac, "validation": val_frac}
    return run_conversion(INFO, src=src, out=out, strict=strict, seed=seed, hf=hf,
                          encoding=encoding, read_files=lambda ctx: _read_files(ctx, fractions),
                          read_hf=lambda ctx: _read_hf(ctx, fractions), build=_build)


def main(argv: list[str] | None = None) -> int:
    return cli_main(INFO, convert, argv, add_split_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
