"""CMExam: Chinese National Medical Licensing Examination MCQs -> MCQ records.

Release format (``data/train.csv``, ``val.csv``, ``test_with_annotations.csv``): UTF-8 CSV with
CRLF between rows and bare LF inside the quoted ``Options`` field (one ``"A text"`` per line),
raw ``"`` inside unquoted fields; columns ``Question, Options, Answer, Explanation`` and, in the
annotated test file, ``Disease Group, Area of Competency, Clinical Department, Medical
Discipline, Difficulty level``. ``Answer`` may hold several letters (``ABD``); some questions
have 4 options; ``Explanation`` may be empty or the placeholder ``请等待更新`` (dropped).

``meta.subject`` is the annotated medical discipline, else ``medicine``; ``meta.label`` is the
clinical department when annotated (``不符合`` = not applicable is not a label).
"""

from __future__ import annotations

from pathlib import Path

from sparsedoc.prep.common import Collected, Context, Row, cli_main, read_hub, read_named_splits, \
    run_conversion
from sparsedoc.prep.records import RowError, check_options, clean_text, make_id, mcq_record, \
    parse_answer, parse_option_lines
from sparsedoc.prep.registry import get_info

INFO = get_info("cmexam")
REQUIRED = ("Question", "Options", "Answer")
NOT_APPLICABLE = "不符合"
PLACEHOLDERS = {"请等待更新"}  # "awaiting update": no explanation at all


def _read_files(ctx: Context) -> Collected:
    return read_named_splits(ctx, (".csv",), lambda path: ctx.read_csv(path, REQUIRED))


def _options(raw) -> dict[str, str]:
    """CSV options are one string; hub copies may hold a dict or a list of {key, value}."""
    if isinstance(raw, dict):
        return check_options(raw, "Options")
    if isinstance(raw, list):
        if not all(isinstance(o, dict) and {"key", "value"} <= set(o) for o in raw):
            raise RowError("Options", "expected a list of {key, value} objects", "bad_options")
        return check_options({o["key"]: o["value"] for o in raw}, "Options")
    return parse_option_lines(raw, "Options")


def _annotation(value) -> str | None:
    text = clean_text(value)
    return text if text and text != NOT_APPLICABLE else None


def _build(row: Row, split: str) -> dict:
    d = row.data
    options = _options(d.get("Options"))
    expl = clean_text(d.get("Explanation"))
    difficulty = clean_text(d.get("Difficulty level"))
    if difficulty and not difficulty.isdigit():
        raise RowError("Difficulty level", f"expected an integer 1-5, got {difficulty!r}")
    return mcq_record(
        make_id(INFO.name, split, row.tag, row.index), d.get("Question"), options,
        parse_answer(d.get("Answer"), options, "Answer"), source=INFO.name, lang="zh",
        subject=_annotation(d.get("Medical Discipline")) or "medicine",
        label=_annotation(d.get("Clinical Department")),
        explanation=None if expl in PLACEHOLDERS else expl, question_field="Question",
        disease_group=_annotation(d.get("Disease Group")),
        competency=_annotation(d.get("Area of Competency")),
        difficulty=int(difficulty) if difficulty else None)


def convert(src: Path | None, out: Path, *, strict: bool = False, seed: int = 0,
            hf: str | None = None, encoding: str | None = None) -> dict:
    """Convert CMExam CSVs (a file or the ``data/`` folder) or a hub copy; return the report."""
    return run_conversion(INFO, src=src, out=out, strict=strict, seed=seed, hf=hf,
                          encoding=encoding, read_files=_read_files, read_hf=read_hub,
                          build=_build)


def main(argv: list[str] | None = None) -> int:
    return cli_main(INFO, convert, argv)


if __name__ == "__main__":
    raise SystemExit(main())
