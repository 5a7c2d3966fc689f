"""CMB (Chinese Medical Benchmark): CMB-Exam -> MCQ records, CMB-Clin -> multi-turn chat records.

Release formats (``data/CMB.zip`` unpacked, or the hub's ``exam`` / ``clin`` configs):

* CMB-Exam: JSON arrays ``CMB-train-merge.json``, ``CMB-val-merge.json`` (with ``explanation``)
  and ``CMB-test-choice-question-merge.json`` (with ``id``, no answers; the answers are in
  ``CMB-test-choice-answer.json``, joined by ``id``). Items: ``exam_type, exam_class,
  exam_subject, question_type, question, option {A..}, answer``. Multi-answer items
  (多项选择题) keep all letters. ``meta.label`` is ``exam_subject`` (a department or discipline).
* CMB-Clin: a JSON array of cases ``{id, title, description, QA_pairs: [{question, solution}]}``.
  The pre-release file (``CME-test-qa/CMB-test-qa.json``, CRLF) names the answer ``answer`` and
  writes ``id`` as a string; both keys are accepted. A case becomes one conversation, as CMB
  evaluates it: the case description with the first question, then each follow-up question.
  ``meta.label`` is the textbook chapter when the title names one (``胆道疾病 案例分析-…``).

``--part exam|clin`` picks the part; ``auto`` converts the one part found under ``--src``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from sparsedoc.prep.common import Collected, ConvertError, Context, Row, cli_main, find_files, \
    load_hf, run_conversion, split_from_name
from sparsedoc.prep.records import RowError, check_options, chat_record, clean_text, make_id, \
    mcq_record, parse_answer, require_text
from sparsedoc.prep.registry import get_info

INFO, INFO_EXAM, INFO_CLIN = get_info("cmb"), get_info("cmb_exam"), get_info("cmb_clin")
CLIN_PROMPT = "以下是一位病人的病例：\n{description}\n{question}"  # CMB's own CMB-Clin prompt


def _kind(rows: list[Row]) -> str | None:
    first = next((r.data for r in rows if isinstance(r.data, dict)), None)
    if first is None:
        return None
    if "QA_pairs" in first:
        return "clin"
    if "option" in first or "options" in first:
        return "exam"
    if "answer" in first and "id" in first and "question" not in first:
        return "answer_key"
    return None


def _scan(ctx: Context) -> dict[str, list[tuple[Path, list[Row]]]]:
    found: dict[str, list[tuple[Path, list[Row]]]] = {"exam": [], "clin": [], "answer_key": []}
    for path in find_files(ctx.src, (".json", ".jsonl")):
        rows = ctx.read_records(path)
        kind = _kind(rows)
        if kind is None:
            ctx.ignore(path, "neither CMB-Exam questions, an answer key, nor CMB-Clin cases")
        else:
            found[kind].append((path, rows))
    return found


def _pick_part(part: str, found: dict) -> str:
    if part != "auto":
        if not found[part]:
            raise ConvertError(f"no CMB-{part.capitalize()} file found under --src")
        return part
    present = [p for p in ("exam", "clin") if found[p]]
    if len(present) != 1:
        raise ConvertError("--src holds " + (" and ".join(f"CMB-{p.capitalize()}" for p in present)
                                             or "no CMB file")
                           + "; convert one part per output folder: prepare cmb_exam / cmb_clin")
    return present[0]


def _answer_key(files: list[tuple[Path, list[Row]]]) -> dict[str, str]:
    key: dict[str, str] = {}
    for _, rows in files:
        for row in rows:
            if isinstance(row.data, dict) and "id" in row.data:
                key[str(row.data["id"])] = row.data.get("answer")
    return key


def _read_files(ctx: Context, part: str) -> Collected:
    found = _scan(ctx)
    part = _pick_part(part, found)
    key = _answer_key(found["answer_key"]) if part == "exam" else {}
    splits: dict[str, list[Row]] = {}
    for path, rows in found[part]:
        split = "test" if part == "clin" else split_from_name(path.stem)
        if split is None:
            ctx.ignore(path, "cannot tell the split from the file name")
            continue
        for row in rows:
            if part == "exam" and isinstance(row.data, dict) and not row.data.get("answer"):
                row.data = {**row.data, "answer": key.get(str(row.data.get("id")))}
        splits.setdefault(split, []).extend(rows)
    return Collected(splits, {"part": part})


def _read_hf(ctx: Context, part: str) -> Collected:
    if part == "auto":
        raise ConvertError("with --hf, choose the part: prepare cmb_exam or cmb_clin")
    splits = load_hf(ctx.hf, part)
    if part == "clin":  # CMB-Clin is an evaluation set, whatever the hub calls its split
        splits = {"test": [r for rows in splits.values() for r in rows]}
    return Collected(splits, {"part": part})


def _build_exam(row: Row, split: str) -> dict:
    d = row.data
    if not isinstance(d, dict):
        raise RowError(None, f"expected a JSON object, got {type(d).__name__}", "malformed_row")
    options = check_options(d.get("option") or d.get("options") or {}, "option")
    if not d.get("answer"):
        raise RowError("answer", "missing (test questions need CMB-test-choice-answer.json "
                                 "beside them)", "missing_answer")
    subject = clean_text(d.get("exam_subject")) or clean_text(d.get("exam_class")) or "medicine"
    oid = d.get("id") if d.get("id") not in (None, "") else row.index
    return mcq_record(make_id(INFO_EXAM.name, split, oid), d.get("question"), options,
                      parse_answer(d.get("answer"), options, "answer"), source=INFO_EXAM.name,
                      lang="zh", subject=subject, label=subject,
                      explanation=d.get("explanation"), exam_type=clean_text(d.get("exam_type")),
                      exam_class=clean_text(d.get("exam_class")),
                      question_type=clean_text(d.get("question_type")))


def _chapter(title: str) -> str | None:
    """``"胆道疾病 案例分析-胆囊结石"`` -> ``"胆道疾病"``; ``"案例分析-丹毒"`` -> None."""
    head = title.split("-", 1)[0]
    chapter = head.replace("案例分析", "").strip()
    return chapter or None


def _build_clin(row: Row, split: str) -> dict:
    d = row.data
    if not isinstance(d, dict):
        raise RowError(None, f"expected a JSON object, got {type(d).__name__}", "malformed_row")
    pairs = d.get("QA_pairs")
    if not isinstance(pairs, list) or not pairs:
        raise RowError("QA_pairs", "expected a non-empty list", "missing_field")
    description = require_text(d.get("description"), "description")
    turns = []
    for i, qa in enumerate(pairs):
        if not isinstance(qa, dict):
            raise RowError(f"QA_pairs[{i}]", "expected an object", "malformed_row")
        question = require_text(qa.get("question"), f"QA_pairs[{i}].question")
        solution = qa.get("solution", qa.get("answer"))
        answer = require_text(solution, f"QA_pairs[{i}].solution (or 'answer')")
        user = CLIN_PROMPT.format(description=description, question=question) if i == 0 \
            else question
        turns.append((user, answer))
    title = clean_text(d.get("title"))
    oid = d.get("id") if d.get("id") not in (None, "") else row.index
    return chat_record(make_id(INFO_CLIN.name, split, oid), turns, source=INFO_CLIN.name,
                       task=INFO_CLIN.task, lang="zh", label=_chapter(title), title=title,
                       n_questions=len(turns))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--part", choices=("auto", "exam", "clin"), default="auto",
                   help="CMB-Exam (MCQ) or CMB-Clin (case QA); auto: the one found in --src")


def convert(src: Path | None, out: Path, *, strict: bool = False, seed: int = 0,
            hf: str | None = None, encoding: str | None = None, part: str = "auto") -> dict:
    """Convert CMB-Exam or CMB-Clin (files, or the hub's exam / clin config); return the report."""
    if part not in ("auto", "exam", "clin"):
        raise ConvertError(f"part must be auto, exam or clin, got {part!r}")
    if hf is not None and part == "auto":
        raise ConvertError("with --hf, choose the part: prepare cmb_exam or cmb_clin")
    if part == "auto":  # find out which part --src holds before choosing the registry entry
        if src is None or not Path(src).exists():
            raise ConvertError(f"{src}: no such file or directory")
        part = _pick_part("auto", _scan(Context(Path(src), encodings=("utf-8-sig", "gb18030"))))
    info, build = (INFO_EXAM, _build_exam) if part == "exam" else (INFO_CLIN, _build_clin)
    return run_conversion(info, src=src, out=out, strict=strict, seed=seed, hf=hf,
                          encoding=encoding, read_files=lambda ctx: _read_files(ctx, part),
                          read_hf=lambda ctx: _read_hf(ctx, part), build=build)


def main(argv: list[str] | None = None) -> int:
    return cli_main(INFO, convert, argv, add_arguments)


if __name__ == "__main__":
    raise SystemExit(main())
