"""The unified record schema every converter writes and every consumer reads.

Two record kinds, one JSON object per line:

* chat (SFT / generation)::

    {"id": str, "messages": [{"role": "system"|"user"|"assistant", "content": str}, ...],
     "meta": {"source": str, "task": str, "lang": str, "label"?: str, ...}}

* multiple choice::

    {"id": str, "question": str, "options": {"A": str, ...}, "answer": "B" | "ABD",
     "explanation"?: str, "meta": {"source": str, "subject": str, "lang": str, "label"?: str, ...}}

``meta.label`` (department, subject or task) is what label-supervised routing uses. For MCQ records
``meta.label`` falls back to ``meta.subject``. Multi-answer items keep all letters, sorted
(``"ABD"``); ``answer_set`` returns them as a set.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

from sparsedoc import fsio
from sparsedoc.errors import MissingFile, UserError
from sparsedoc.resources import resolve_path

ROLES = ("system", "user", "assistant")
OPTION_LETTERS = "ABCDEFGHIJ"


class RecordError(UserError, ValueError):
    """A record does not match the schema. The message names the file, line and field."""


def _where(path: str | os.PathLike | None, line: int | None) -> str:
    if path is None:
        return "record"
    return f"{path}:{line}" if line is not None else str(path)


def _shown(value: Any) -> str:
    """How an offending value appears in a message: short scalars as they are; longer text only
    by its length, so an error printed to a shared log never carries record text."""
    if value == "nothing (the field is missing)":
        return value
    if isinstance(value, str) and len(value) > 24:
        return f"a {len(value)}-character string"
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    return f"{value!r:.40}"


def _require(cond: bool, where: str, field_name: str, expected: str, got: Any = None) -> None:
    if not cond:
        got_txt = "" if got is None else f", got {_shown(got)}"
        raise RecordError(f"{where}: field '{field_name}': expected {expected}{got_txt}")


def _validate_meta(meta: Any, where: str, required: tuple[str, ...]) -> None:
    _require(isinstance(meta, dict), where, "meta", "an object",
             "nothing (the field is missing)" if meta is None else type(meta).__name__)
    for key in required:
        _require(isinstance(meta.get(key), str) and meta[key] != "", where, f"meta.{key}",
                 "a non-empty string", meta.get(key))
    if "label" in meta:
        _require(isinstance(meta["label"], str), where, "meta.label", "a string", meta["label"])


def record_kind(record: dict) -> str:
    """'chat' or 'mcq', decided by which fields the record carries."""
    if "messages" in record:
        return "chat"
    if "options" in record:
        return "mcq"
    return "unknown"


def validate_record(record: Any, where: str = "record") -> str:
    """Check one record against the schema; return its kind ('chat' or 'mcq').

    Raises:
        RecordError: naming ``where`` and the offending field.
    """
    _require(isinstance(record, dict), where, "<record>", "a JSON object", type(record).__name__)
    _require(isinstance(record.get("id"), str) and record["id"] != "", where, "id",
             "a non-empty string", record.get("id"))
    kind = record_kind(record)
    if kind == "chat":
        msgs = record["messages"]
        _require(isinstance(msgs, list) and len(msgs) > 0, where, "messages", "a non-empty list")
        for i, m in enumerate(msgs):
            _require(isinstance(m, dict), where, f"messages[{i}]", "an object")
            _require(m.get("role") in ROLES, where, f"messages[{i}].role", f"one of {ROLES}",
                     m.get("role"))
            _require(isinstance(m.get("content"), str), where, f"messages[{i}].content", "a string")
        _require(any(m["role"] == "assistant" for m in msgs), where, "messages",
                 "at least one assistant message (the training target)")
        _validate_meta(record.get("meta"), where, ("source", "task", "lang"))
    elif kind == "mcq":
        _require(isinstance(record.get("question"), str) and record["question"].strip() != "",
                 where, "question", "a non-empty string", record.get("question"))
        opts = record["options"]
        _require(isinstance(opts, dict) and len(opts) >= 2, where, "options",
                 "an object with at least two options")
        for letter, text in opts.items():
            _require(len(letter) == 1 and letter in OPTION_LETTERS, where, f"options.{letter}",
                     f"a key among {OPTION_LETTERS}")
            _require(isinstance(text, str), where, f"options.{letter}", "a string", text)
        ans = record.get("answer")
        _require(isinstance(ans, str) and len(ans) >= 1, where, "answer",
                 "one or more option letters", ans)
        bad = [c for c in ans if c not in opts]
        _require(not bad, where, "answer", f"letters among the options {''.join(opts)}", ans)
        _require(list(ans) == sorted(set(ans)), where, "answer",
                 "letters sorted and without repeats (e.g. 'ABD')", ans)
        _validate_meta(record.get("meta"), where, ("source", "subject", "lang"))
    else:
        raise RecordError(f"{where}: expected a chat record (field 'messages') or an MCQ record "
                          f"(field 'options'); got keys {sorted(record)}")
    return kind


def answer_set(record: dict) -> frozenset[str]:
    """The set of correct letters of an MCQ record."""
    return frozenset(record["answer"])


def record_label(record: dict) -> str | None:
    """The routing label of a record: ``meta.label``, else ``meta.subject`` (MCQ)."""
    meta = record.get("meta", {})
    return meta.get("label") or meta.get("subject")


def routing_label(record: dict) -> str | None:
    """The label routing is supervised and analysed by: ``record_label``, else ``meta.source``
    (so a mixture without departments is still labelled by the dataset each record came from)."""
    return record_label(record) or record.get("meta", {}).get("source")


def _decode_hint(path, raw: bytes, err: UnicodeDecodeError, encoding: str) -> str:
    """The message for a data file that is not in ``encoding``: where it fails, and whether it
    reads as GB18030 / GBK (common in Chinese hospital exports)."""
    from sparsedoc.prep.records import looks_chinese

    line = raw[:err.start].count(b"\n") + 1
    msg = (f"{path}:{line}: not {encoding} text (byte 0x{raw[err.start]:02x} at offset "
           f"{err.start})")
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return msg + "; it starts with a UTF-16 byte-order mark: set data.encoding=utf-16"
    if encoding.replace("-", "").lower() in ("utf8", "utf8sig"):
        try:
            text = raw.decode("gb18030")
        except UnicodeDecodeError:
            text = ""
        if text and looks_chinese(text):
            return (msg + "; it reads as GB18030/GBK-encoded Chinese: set data.encoding=gb18030, "
                          "or convert it once with iconv -f gb18030 -t utf-8")
    return msg + "; set data.encoding to the file's encoding, or convert it to UTF-8"


def iter_jsonl(path: str | os.PathLike, validate: bool = True,
               encoding: str = "utf-8") -> Iterator[dict]:
    """Yield records of a unified JSONL file; a malformed line raises with file and line number.

    Blank lines are allowed and ignored (they carry no record); a UTF-8 byte-order mark is
    skipped. A file in another encoding is refused with a hint (GB18030/GBK is recognised)
    unless ``encoding`` names it. A bundled file is named by its source-tree path
    (``sparsedoc/prep/demo/train.jsonl``) and found in the installed package.

    Raises:
        MissingFile: no such file. RecordError: undecodable text, bad JSON, a schema violation.
    """
    path = resolve_path(path)
    if not path.is_file():
        raise MissingFile(f"{path}: no such data file")
    raw = path.read_bytes()
    codec = "utf-8-sig" if encoding.replace("-", "").lower() == "utf8" else encoding
    try:
        text = raw.decode(codec)
    except LookupError:
        raise RecordError(f"{path}: unknown text encoding {encoding!r} (data.encoding)") from None
    except UnicodeDecodeError as e:
        raise RecordError(_decode_hint(path, raw, e, encoding)) from None
    for lineno, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except RecursionError:
            raise RecordError(f"{path}:{lineno}: JSON nested too deeply to be a record") from None
        except json.JSONDecodeError as e:
            cut = " (the file ends mid-record: truncated?)" if lineno == text.count("\n") + 1 \
                and not text.endswith("\n") else ""
            raise RecordError(f"{path}:{lineno}: not valid JSON ({e.msg} at column {e.colno})"
                              f"{cut}") from None
        if validate:
            validate_record(record, _where(path, lineno))
        yield record


def read_jsonl(path: str | os.PathLike, validate: bool = True,
               encoding: str = "utf-8") -> list[dict]:
    """All records of a unified JSONL file, validated; duplicate ids are an error."""
    records = list(iter_jsonl(path, validate=validate, encoding=encoding))
    seen: dict[str, int] = {}
    for i, r in enumerate(records):
        if r.get("id") in seen:
            raise RecordError(f"{path}: duplicate id {r['id']!r} (records {seen[r['id']] + 1} and "
                              f"{i + 1})")
        seen[r.get("id")] = i
    return records


def write_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Write records atomically (temp file + rename), UTF-8, one JSON object a line."""
    fsio.write_lines(path, (json.dumps(r, ensure_ascii=False) for r in records))


@dataclass
class SkipReport:
    """Counts of what a converter read, wrote and skipped, with the reason for every skip."""

    records_in: int = 0
    records_out: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)

    def skip(self, where: str, reason: str) -> None:
        self.skipped.append((where, reason))

    def summary(self) -> str:
        lines = [f"in={self.records_in} out={self.records_out} skipped={len(self.skipped)}"]
        lines += [f"  skipped {w}: {r}" for w, r in self.skipped]
        return "\n".join(lines)


def mcq_to_chat(record: dict, with_explanation: bool = True) -> dict:
    """Turn an MCQ record into an instruction record whose answer is the letter(s) (+ explanation).

    Used to train on exam data; evaluation scores MCQ records directly.
    """
    opts = "\n".join(f"{k}. {v}" for k, v in record["options"].items())
    zh = record["meta"].get("lang") == "zh"
    prompt = f"{record['question']}\n{opts}\n" + ("请给出正确选项。" if zh else "Answer with the letter of the correct option.")
    answer = (f"答案：{record['answer']}" if zh else f"Answer: {record['answer']}")
    expl = (record.get("explanation") or "").strip()
    if with_explanation and expl:
        answer += ("\n解析：" if zh else "\nExplanation: ") + expl
    meta = {"source": record["meta"]["source"], "task": "mcq", "lang": record["meta"]["lang"],
            "label": record_label(record) or record["meta"]["subject"]}
    return {"id": record["id"], "messages": [{"role": "user", "content": prompt},
                                             {"role": "assistant", "content": answer}],
            "meta": meta}
