"""MedQA (USMLE 5-option and 4-option, and the Mainland / Taiwan variants) -> MCQ records.

Release format: JSON Lines ``data_clean/questions/US/{train,dev,test}.jsonl`` (5 options) and
``US/4_options/phrases_no_exclude_{train,dev,test}.jsonl`` (4 options, plus
``metamap_phrases``); keys ``question, answer (option text), options {A..}, meta_info
(step1 / step2&3), answer_idx``. ``answer_idx`` is checked against the options and against the
answer text; when it is missing the letter is found from the text. The language is detected
per question, so the Chinese variants convert too. ``meta.subject`` / ``meta.label`` is
``meta_info``. Ids are ``medqa-<split>-<line>``, with the file in them when a split is read from
several files (both variants, or several countries).
"""

from __future__ import annotations

from pathlib import Path

from sparsedoc.prep.common import Collected, Context, Row, cli_main, read_hub, read_named_splits, \
    run_conversion
from sparsedoc.prep.records import RowError, check_options, clean_text, detect_lang, make_id, \
    mcq_record, parse_answer
from sparsedoc.prep.registry import get_info

INFO = get_info("medqa")


def _read_files(ctx: Context) -> Collected:
    return read_named_splits(ctx, (".jsonl", ".json"), ctx.read_records)


def _answer_letter(d: dict, options: dict[str, str]) -> str:
    text = clean_text(d.get("answer"))
    if d.get("answer_idx"):
        letter = parse_answer(d["answer_idx"], options, "answer_idx")
        if text and clean_text(options[letter]) != text:
            raise RowError("answer", f"text {text[:60]!r} is not option {letter} "
                                     f"({options[letter][:60]!r})", "bad_answer")
        return letter
    matches = [k for k, v in options.items() if v == text]
    if len(matches) != 1:
        raise RowError("answer_idx", "missing, and the answer text matches "
                                     f"{len(matches)} options", "bad_answer")
    return matches[0]


def _build(row: Row, split: str) -> dict:
    d = row.data
    if not isinstance(d, dict):
        raise RowError(None, f"expected a JSON object, got {type(d).__name__}", "malformed_row")
    options = d.get("options")
    if not isinstance(options, dict):
        raise RowError("options", "expected an object {A: text, ...}", "bad_options")
    options = check_options(options, "options")
    question = clean_text(d.get("question"))
    subject = clean_text(d.get("meta_info")) or "medicine"
    return mcq_record(make_id(INFO.name, split, row.tag, row.index), question, options,
                      _answer_letter(d, options), source=INFO.name, lang=detect_lang(question),
                      subject=subject, label=subject)


def convert(src: Path | None, out: Path, *, strict: bool = False, seed: int = 0,
            hf: str | None = None, encoding: str | None = None) -> dict:
    """Convert MedQA JSON Lines (a file or a folder) or a hub copy; return the report."""
    return run_conversion(INFO, src=src, out=out, strict=strict, seed=seed, hf=hf,
                          encoding=encoding, read_files=_read_files, read_hf=read_hub,
                          build=_build)


def main(argv: list[str] | None = None) -> int:
    return cli_main(INFO, convert, argv)


if __name__ == "__main__":
    raise SystemExit(main())
