"""What every converter shares: the readers (re-exported from ``data_prep.readers``), seeded
splits, the conversion runner (validate, count, report, write) and the per-converter CLI.

A converter reads its files (or a Hugging Face dataset) into ``Row`` objects, each knowing where it
came from (``"data/val.csv: row 7 (line 9)"``), and gives a ``build(row, split)`` function that
turns one row into one unified record or raises ``RowError``. ``run_conversion`` does the rest:
a bad row is skipped and reported with its file, row/line and field, or stops the run under
``strict``; nothing is dropped silently. Output: ``OUT/<split>.jsonl``, ``report.json``,
``manifest.json`` (provenance, copied into training runs) and a ``README.md`` dataset card.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from sparsedoc import fsio
from sparsedoc.prep.readers import Context, ConvertError, Row, SourceFile, find_files, load_hf, \
    split_from_name
from sparsedoc.prep.records import RowError, content_key
from sparsedoc.data.schema import RecordError, SkipReport, record_label, validate_record, \
    write_jsonl

__all__ = ["Collected", "Context", "ConvertError", "Row", "RowError", "SourceFile",
           "add_split_arguments", "build_parser", "cli_main", "find_files", "load_hf",
           "read_hub", "read_named_splits", "run_conversion", "seeded_split", "split_from_name",
           "summarize"]

SPLIT_ORDER = ("train", "validation", "dev", "test")


def seeded_split(rows: list[Row], key: Callable[[Row], str], seed: int,
                 fractions: dict[str, float],
                 stratify: Callable[[Row], str] | None = None) -> dict[str, list[Row]]:
    """Deterministic split for sources that ship none: rows are ranked by ``sha256(seed:key)``
    and the first ranks fill each held-out split up to its fraction; the rest is ``train``.

    Rows with the same key (duplicates) always land in the same split, and a row keeps its split
    when others are added, so held-out sets stay held out across dataset versions. With
    ``stratify``, each stratum (e.g. each label) is split on its own, keeping label shares.
    """
    if any(f < 0 for f in fractions.values()) or sum(fractions.values()) >= 1:
        raise ConvertError(f"split fractions {fractions} must be >= 0 and sum to less than 1")
    if stratify is not None:
        strata: dict[str, list[Row]] = {}
        for row in rows:
            strata.setdefault(stratify(row) if row.error is None else "", []).append(row)
        merged: dict[str, list[Row]] = {}
        for part in strata.values():
            for name, rs in seeded_split(part, key, seed, fractions).items():
                merged.setdefault(name, []).extend(rs)
        return {name: sorted(rs, key=lambda r: (r.file, r.index)) for name, rs in merged.items()}
    groups: dict[str, list[Row]] = {}
    for row in rows:
        groups.setdefault(key(row) if row.error is None else row.where, []).append(row)
    ranked = sorted(groups, key=lambda k: hashlib.sha256(f"{seed}:{k}".encode()).hexdigest())
    targets = [(name, round(frac * len(rows))) for name, frac in fractions.items()]
    out: dict[str, list[Row]] = {name: [] for name, _ in targets}
    out["train"] = []
    t = 0
    for k in ranked:
        while t < len(targets) and len(out[targets[t][0]]) >= targets[t][1]:
            t += 1
        out[targets[t][0] if t < len(targets) else "train"].extend(groups[k])
    return {name: sorted(rs, key=lambda r: (r.file, r.index)) for name, rs in out.items() if rs}


@dataclass
class Collected:
    """What a converter's reader returns: rows per split, and the options that shaped them (for
    the report); the files it read are recorded on the Context."""

    splits: dict[str, list[Row]]
    options: dict[str, Any] = field(default_factory=dict)


Reader = Callable[[Context], Collected]
Builder = Callable[[Row, str], dict]


def read_named_splits(ctx: Context, suffixes: tuple[str, ...],
                      read: Callable[[Path], list[Row]]) -> Collected:
    """Rows of every file under ``src``, grouped by the split its name says (``val.csv``,
    ``MTS-Dialog-TrainingSet.csv``, ``test.jsonl``); a file naming no split is listed as ignored."""
    splits: dict[str, list[Row]] = {}
    for path in find_files(ctx.src, suffixes):
        split = split_from_name(path.stem)
        if split is None:
            ctx.ignore(path, "cannot tell the split from the file name")
            continue
        splits.setdefault(split, []).extend(read(path))
    return Collected(splits)


def read_hub(ctx: Context) -> Collected:
    """A hub copy that keeps the release's splits and column names, as it is."""
    return Collected(load_hf(ctx.hf))


def add_split_arguments(p: argparse.ArgumentParser) -> None:
    """``--val-frac`` / ``--test-frac`` of converters whose source ships no splits."""
    p.add_argument("--val-frac", type=float, default=0.1, help="validation share (default 0.1)")
    p.add_argument("--test-frac", type=float, default=0.1, help="test share (default 0.1)")


def run_conversion(info, *, src: Path | str | None, out: Path | str, strict: bool, seed: int,
                   hf: str | None, read_files: Reader, read_hf: Reader, build: Builder,
                   encoding: str | None = None) -> dict:
    """Read, build, validate and write one dataset; return the report (also in report.json).

    Args:
        info: the registry entry (``data_prep.registry.DatasetInfo``).
        src: the dataset as released (a file or folder); ignored when ``hf`` is given.
        out: output folder.
        strict: stop at the first bad row instead of skipping it.
        seed: seed of the split for sources without official splits.
        hf: a Hugging Face hub id to read instead of ``src``.
        read_files / read_hf: the converter's readers.
        build: turns one ``Row`` into one record for a split, or raises ``RowError``.
        encoding: force this text encoding instead of trying utf-8-sig (then gb18030 for zh).

    Raises:
        ConvertError: a file-level problem, or under ``strict`` the first bad row.
    """
    t0 = time.perf_counter()
    if hf is None and src is None:
        raise ConvertError("give --src PATH (the dataset as released) or --hf ID")
    encodings = (encoding,) if encoding else (
        ("utf-8-sig", "gb18030") if info.lang == "zh" else ("utf-8-sig",))
    ctx = Context(None if hf else Path(src), hf=hf, seed=seed, encodings=encodings)
    if hf is None and not Path(src).exists():
        raise ConvertError(f"{src}: no such file or directory")
    collected = read_hf(ctx) if hf else read_files(ctx)
    _tag_files(collected.splits)
    results, seen = {}, {}
    for split in sorted(collected.splits, key=_split_rank):
        results[split] = _convert_split(collected.splits[split], split, build, strict, seen)
    if not any(recs for recs, _ in results.values()):
        raise ConvertError(f"{info.name}: no records converted from {hf or src}")
    _count_duplicates(results)
    report = _report(info, ctx, results, src=src, hf=hf, strict=strict, seed=seed,
                     options=collected.options)
    _write_outputs(Path(out), info, results, report, t0)
    return report


def _tag_files(splits: dict[str, list[Row]]) -> None:
    """Tag the rows of splits read from several files with their file (path without suffix)."""
    for rows in splits.values():
        if len({r.file for r in rows}) > 1:
            for row in rows:
                row.tag = re.sub(r"[^0-9A-Za-z]+", "_", str(Path(row.file).with_suffix(""))) \
                    .strip("_")


def _split_rank(name: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(name) if name in SPLIT_ORDER else len(SPLIT_ORDER), name)


def _convert_split(rows: list[Row], split: str, build: Builder, strict: bool,
                   seen: dict[str, str]) -> tuple[list[dict], dict]:
    counts = SkipReport()
    kinds: Counter = Counter()
    records: list[dict] = []
    for row in rows:
        counts.records_in += 1
        try:
            if row.error is not None:
                raise row.error
            rec = build(row, split)
            validate_record(rec, row.where)
            if rec["id"] in seen:
                raise RowError("id", f"duplicate id {rec['id']!r} (first at {seen[rec['id']]})",
                               "duplicate_id")
        except RecordError as e:  # a converter bug surfaces as a reported skip, not a crash
            if strict:
                raise ConvertError(str(e)) from None
            counts.skip(row.where, str(e).removeprefix(f"{row.where}: "))
            kinds["schema"] += 1
            continue
        except (RowError, KeyError, TypeError, AttributeError, ValueError) as e:
            if not isinstance(e, RowError):  # a shape the converter did not expect
                e = RowError(None, f"unexpected content ({type(e).__name__}: {e})", "unexpected")
            if strict:
                raise ConvertError(f"{row.where}: {e}") from None
            counts.skip(row.where, str(e))
            kinds[e.kind] += 1
            continue
        seen[rec["id"]] = row.where
        records.append(rec)
    counts.records_out = len(records)
    labels = Counter(record_label(r) or "(none)" for r in records)
    answers = Counter(r.get("answer") or r["meta"].get("answer") for r in records)
    answers.pop(None, None)
    stats = {"in": counts.records_in, "out": counts.records_out, "skipped": len(counts.skipped),
             "skip_kinds": dict(kinds),
             "skips": [{"where": w, "reason": r} for w, r in counts.skipped],
             "labels": dict(labels.most_common()), "answers": dict(sorted(answers.items()))}
    return records, stats


def _count_duplicates(results: dict[str, tuple[list[dict], dict]]) -> None:
    """Per split: records repeating an earlier one of the same split (``duplicates``) and
    records also found in an earlier split (``overlap``, a leak between official splits)."""
    first: dict[str, str] = {}
    for split, (records, stats) in results.items():
        dup, overlap = 0, Counter()
        for rec in records:
            key = content_key(rec)
            if key not in first:
                first[key] = split
            elif first[key] == split:
                dup += 1
            else:
                overlap[first[key]] += 1
        stats["duplicates"], stats["overlap"] = dup, dict(overlap)


def _report(info, ctx: Context, results: dict, **run: Any) -> dict:
    splits = {name: stats for name, (_, stats) in results.items()}
    totals = {k: sum(s[k] for s in splits.values()) for k in ("in", "out", "skipped")}
    return {"source": info.name, "title": info.title, "task": info.task, "lang": info.lang,
            "license": info.license, "non_commercial": info.non_commercial,
            "src": None if run["src"] is None else str(run["src"]), "hf": run["hf"],
            "strict": run["strict"], "seed": run["seed"], "options": run["options"],
            "files": [asdict(f) for f in ctx.files], "ignored_files": ctx.ignored,
            "warnings": ctx.warnings, "totals": totals, "splits": splits}


def _write_outputs(out: Path, info, results: dict, report: dict, t0: float) -> None:
    from sparsedoc.prep.card import render_card  # card rendering is its own concern

    out.mkdir(parents=True, exist_ok=True)
    _remove_stale(out, set(results))
    outputs = {}
    for split, (records, _) in results.items():
        path = out / f"{split}.jsonl"
        write_jsonl(path, records)
        outputs[split] = {"path": path.name, "records": len(records),
                          "sha256": fsio.file_sha256(path)}
    report["outputs"] = outputs
    report["seconds"] = round(time.perf_counter() - t0, 3)
    manifest = {"kind": "conversion", "created_by": f"sparsedoc.prep.{info.module}",
                **{k: report[k] for k in ("source", "title", "license", "non_commercial", "src",
                                          "hf", "strict", "seed", "options", "totals")},
                "inputs": [{k: f[k] for k in ("path", "sha256", "encoding")}
                           for f in report["files"]],
                "outputs": outputs}
    fsio.write_json(out / "report.json", report)
    fsio.write_json(out / "manifest.json", manifest)
    example = next((recs[0] for recs, _ in results.values() if recs), None)
    fsio.write_text(out / "README.md", render_card(info, report, example))


def _remove_stale(out: Path, splits: set[str]) -> None:
    """Delete split files a previous conversion into ``out`` wrote and this one does not."""
    old = out / "report.json"
    if not old.is_file():
        return
    try:
        previous = json.loads(old.read_text(encoding="utf-8")).get("outputs", {})
    except (OSError, ValueError):
        return
    for split, entry in previous.items():
        if split not in splits and (out / entry.get("path", "")).is_file():
            (out / entry["path"]).unlink()


# ---------------------------------------------------------------------------------------------
# CLI shared by every converter: ``python -m data_prep.<name> --src PATH --out DIR ...``

COMMON_ARGS = ("src", "out", "strict", "seed", "hf", "encoding")


def build_parser(info, add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
                 prog: str | None = None) -> argparse.ArgumentParser:
    """The argument parser of one converter: the common options plus its own."""
    p = argparse.ArgumentParser(prog=prog or f"python -m data_prep.{info.module}",
                                description=f"Convert {info.title} to the sparsedoc schema. "
                                            f"License: {info.license}.")
    p.add_argument("--src", type=Path, help="the dataset as released (file or folder)")
    p.add_argument("--hf", metavar="ID", help=f"read from the Hugging Face hub instead "
                                              f"(e.g. {info.hf_id or 'owner/name'})")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--strict", action="store_true", help="stop at the first bad row")
    p.add_argument("--seed", type=int, default=0, help="seed of splits the source lacks")
    p.add_argument("--encoding", help="force a text encoding (default: utf-8-sig, then gb18030 "
                                      "for Chinese sources)")
    if add_arguments:
        add_arguments(p)
    return p


def cli_main(info, convert: Callable[..., dict], argv: list[str] | None = None,
             add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
             prog: str | None = None) -> int:
    """Parse ``argv``, run ``convert``, print a summary; 0 on success, 2 on a conversion error."""
    args = build_parser(info, add_arguments, prog).parse_args(argv)
    if args.src is None and args.hf is None:
        print("error: give --src PATH or --hf ID", file=sys.stderr)
        return 2
    extra = {k: v for k, v in vars(args).items() if k not in COMMON_ARGS}
    try:
        report = convert(args.src, args.out, strict=args.strict, seed=args.seed, hf=args.hf,
                         encoding=args.encoding, **extra)
    except ConvertError as e:
        print(f"error: {info.name}: {e}", file=sys.stderr)
        return 2
    print(summarize(report, args.out))
    return 0


def summarize(report: dict, out: Path, max_skips: int = 30) -> str:
    """Human-readable summary of a report; skips are listed one by one (up to ``max_skips``)."""
    lines = [f"{report['source']}: wrote {out} in {report['seconds']:.2f} s"
             + ("  [NON-COMMERCIAL license]" if report["non_commercial"] else "")]
    shapes = Counter((f["format"] or "text", f["encoding"], f["line_endings"])
                     for f in report["files"])
    for (fmt, enc, endings), n in shapes.items():
        first = next(f["path"] for f in report["files"]
                     if (f["format"] or "text", f["encoding"], f["line_endings"]) == (fmt, enc,
                                                                                     endings))
        what = first if n == 1 else f"{n} files like {first}"
        lines.append(f"  read {what} ({fmt}, {enc}, {endings} line endings)")
    for name, s in report["splits"].items():
        lines.append(f"  {name:<10} in {s['in']:>6}  out {s['out']:>6}  skipped {s['skipped']}"
                     + (f"  ({s['duplicates']} duplicates kept)" if s.get("duplicates") else ""))
    skips = [s for split in report["splits"].values() for s in split["skips"]]
    lines += [f"  skipped {s['where']}: {s['reason']}" for s in skips[:max_skips]]
    if len(skips) > max_skips:
        lines.append(f"  ... {len(skips) - max_skips} more skips in report.json")
    lines += [f"  note: {w}" for w in report["warnings"]]
    lines += [f"  ignored {i['path']}: {i['reason']}" for i in report["ignored_files"]]
    return "\n".join(lines)
