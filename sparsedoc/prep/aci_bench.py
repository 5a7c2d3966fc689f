"""ACI-Bench: a full doctor-patient encounter -> the full visit note.

Release formats, both accepted (the CSV is preferred when both hold the same file):

* ``challenge_data/<name>.csv``: columns ``dataset, encounter_id, dialogue, note`` (quoted
  multi-line fields), with ``<name>_metadata.csv`` beside it (``cc`` = chief complaint...).
* ``challenge_data_json/<name>.json``: ``{"data": [{"src", "tgt", "file": "D2N001-aci"}]}``.

Split from the name (``train``, ``valid``, ``*test1/2/3``). Section-only JSONs (``*_subjective``,
``*_objective_exam``...) and the ASR experiment copies (``src_experiment_data*``) are listed as
ignored. Ids use the encounter id, so both forms give the same ids.
"""

from __future__ import annotations

from pathlib import Path

from sparsedoc.prep.common import Collected, Context, Row, cli_main, find_files, load_hf, \
    run_conversion, split_from_name
from sparsedoc.prep.records import RowError, chat_record, clean_text, make_id, require_text
from sparsedoc.prep.registry import get_info

INFO = get_info("aci_bench")
REQUIRED = ("encounter_id", "dialogue", "note")
SECTION_SUFFIXES = ("_subjective", "_objective_exam", "_objective_results",
                    "_assessment_and_plan")
PROMPT = ("Here is the transcript of a doctor-patient encounter:\n\n{dialogue}\n\n"
          "Write the full clinical visit note for this encounter.")


def _stem(path: Path) -> str:
    return path.stem[: -len("_full")] if path.stem.endswith("_full") else path.stem


def _metadata(ctx: Context, path: Path) -> dict[str, dict]:
    meta_path = path.with_name(f"{path.stem}_metadata.csv")
    if not meta_path.is_file():
        return {}
    return {r.data["encounter_id"]: r.data for r in ctx.read_csv(meta_path, ("encounter_id",))
            if r.error is None}


def _read_files(ctx: Context) -> Collected:
    files = find_files(ctx.src, (".csv", ".json"))
    csv_stems = {_stem(p) for p in files if p.suffix == ".csv"}
    splits: dict[str, list[Row]] = {}
    for path in files:
        split = split_from_name(_stem(path))
        if "src_experiment_data" in path.parts:
            ctx.ignore(path, "ASR experiment copy of the challenge data")
        elif path.stem.endswith("_metadata"):
            if not path.with_name(path.name.replace("_metadata.csv", ".csv")).is_file():
                ctx.ignore(path, "metadata without its data file")
        elif path.stem.endswith(SECTION_SUFFIXES):
            ctx.ignore(path, "section-only note targets; the full note is converted")
        elif path.suffix == ".json" and _stem(path) in csv_stems:
            ctx.ignore(path, "same encounters as the CSV form, which is converted (has metadata)")
        elif split is None:
            ctx.ignore(path, "cannot tell the split from the file name")
        elif path.suffix == ".csv":
            meta = _metadata(ctx, path)
            rows = ctx.read_csv(path, REQUIRED)
            for row in rows:
                if row.error is None:
                    row.data["_meta"] = meta.get(row.data["encounter_id"], {})
            splits.setdefault(split, []).extend(rows)
        else:
            splits.setdefault(split, []).extend(_json_rows(ctx.read_records(path)))
    return Collected(splits)


def _json_rows(rows: list[Row]) -> list[Row]:
    """``{"src", "tgt", "file": "D2N001-aci"}`` -> the CSV row layout."""
    for row in rows:
        if row.error is None and isinstance(row.data, dict):
            encounter, _, subset = clean_text(row.data.get("file")).partition("-")
            row.data = {"encounter_id": encounter, "dataset": subset,
                        "dialogue": row.data.get("src"), "note": row.data.get("tgt")}
    return rows


def _read_hf(ctx: Context) -> Collected:
    splits = load_hf(ctx.hf)
    for rows in splits.values():
        if rows and "src" in rows[0].data:
            _json_rows(rows)
    return Collected(splits)


def _build(row: Row, split: str) -> dict:
    d = row.data
    if not isinstance(d, dict):
        raise RowError(None, f"expected a JSON object, got {type(d).__name__}", "malformed_row")
    encounter = require_text(d.get("encounter_id"), "encounter_id")
    meta = d.get("_meta") or {}
    age = clean_text(meta.get("patient_age"))
    user = PROMPT.format(dialogue=require_text(d.get("dialogue"), "dialogue"))
    return chat_record(make_id(INFO.name, split, encounter), [(user, require_text(d.get("note"),
                                                                                   "note"))],
                       source=INFO.name, task=INFO.task, lang="en", encounter_id=encounter,
                       subset=clean_text(d.get("dataset")),
                       chief_complaint=clean_text(meta.get("cc")),
                       patient_gender=clean_text(meta.get("patient_gender")),
                       patient_age=int(age) if age.isdigit() else None)


def convert(src: Path | None, out: Path, *, strict: bool = False, seed: int = 0,
            hf: str | None = None, encoding: str | None = None) -> dict:
    """Convert ACI-Bench (CSV or JSON form, a file or a folder) or a hub copy; return the report."""
    return run_conversion(INFO, src=src, out=out, strict=strict, seed=seed, hf=hf,
                          encoding=encoding, read_files=_read_files, read_hf=_read_hf,
                          build=_build)


def main(argv: list[str] | None = None) -> int:
    return cli_main(INFO, convert, argv)


if __name__ == "__main__":
    raise SystemExit(main())
