"""MTS-Dialog: doctor-patient conversation -> one section of the clinical note.

Release format: ``Main-Dataset/MTS-Dialog-TrainingSet.csv``, ``-ValidationSet.csv`` and the two
``-TestSet-*.csv`` files; UTF-8 CSV, columns ``ID, section_header, section_text, dialogue``. The
dialogue is a quoted multi-line field (CRLF inside the field in the training set, bare LF in the
validation set; both become LF). ``meta.label`` is the normalised section header (``GENHX``...).
"""

from __future__ import annotations

from pathlib import Path

from sparsedoc.prep.common import Collected, Context, Row, cli_main, read_hub, read_named_splits, \
    run_conversion
from sparsedoc.prep.records import chat_record, clean_text, make_id, require_text
from sparsedoc.prep.registry import get_info

INFO = get_info("mts_dialog")
REQUIRED = ("section_header", "section_text", "dialogue")
SECTIONS = {
    "GENHX": "history of present illness", "FAM/SOCHX": "family and social history",
    "PASTMEDICALHX": "past medical history", "CC": "chief complaint",
    "PASTSURGICAL": "past surgical history", "ALLERGY": "allergies",
    "ROS": "review of systems", "MEDICATIONS": "medications", "ASSESSMENT": "assessment",
    "EXAM": "physical exam", "DIAGNOSIS": "diagnosis", "DISPOSITION": "disposition",
    "PLAN": "plan", "EDCOURSE": "emergency department course",
    "IMMUNIZATIONS": "immunizations", "IMAGING": "imaging", "GYNHX": "gynecologic history",
    "PROCEDURES": "procedures", "OTHER_HISTORY": "other history", "LABS": "labs",
}
PROMPT = ("Here is a conversation between a doctor and a patient:\n\n{dialogue}\n\n"
          "Write the \"{section}\" section of the clinical note.")


def _read_files(ctx: Context) -> Collected:
    return read_named_splits(ctx, (".csv",), lambda path: ctx.read_csv(path, REQUIRED))


def _build(row: Row, split: str) -> dict:
    d = row.data
    header = require_text(d.get("section_header"), "section_header").upper()
    dialogue = require_text(d.get("dialogue"), "dialogue")
    text = require_text(d.get("section_text"), "section_text")
    oid = clean_text(d.get("ID")) or row.index
    user = PROMPT.format(dialogue=dialogue, section=SECTIONS.get(header, header.lower()))
    return chat_record(make_id(INFO.name, split, row.tag, oid), [(user, text)], source=INFO.name,
                       task=INFO.task, lang="en", label=header)


def convert(src: Path | None, out: Path, *, strict: bool = False, seed: int = 0,
            hf: str | None = None, encoding: str | None = None) -> dict:
    """Convert MTS-Dialog CSVs (a file or ``Main-Dataset/``) or a hub copy; return the report."""
    return run_conversion(INFO, src=src, out=out, strict=strict, seed=seed, hf=hf,
                          encoding=encoding, read_files=_read_files, read_hf=read_hub,
                          build=_build)


def main(argv: list[str] | None = None) -> int:
    return cli_main(INFO, convert, argv)


if __name__ == "__main__":
    raise SystemExit(main())
