"""Build unified-schema records from raw fields, raising ``RowError`` on anything a row gets wrong.

Converters call these instead of writing dicts by hand, so every dataset validates answers,
options and empty texts the same way and names the offending field the same way.
"""

from __future__ import annotations

import re
import unicodedata
from typing import Any

from sparsedoc.data.schema import OPTION_LETTERS


class RowError(ValueError):
    """One source row cannot be converted; it is skipped and reported (fatal under --strict).

    ``kind`` groups skips in the report (``bad_answer``, ``missing_field``, ``malformed_row``...).
    """

    def __init__(self, field: str | None, message: str, kind: str = "invalid"):
        self.field, self.kind = field, kind
        super().__init__(f"field '{field}': {message}" if field else message)


_BREAKS = re.compile(r"\r\n|[\r\x85\u2028\u2029]")


def clean_text(value: Any) -> str:
    """Text with every line break (CRLF, CR, NEL, U+2028/2029) turned into LF and outer
    whitespace stripped; tools that split lines on those characters then agree with ours."""
    if value is None:
        return ""
    if not isinstance(value, str):
        value = str(value)
    return _BREAKS.sub("\n", value).strip()


def require_text(value: Any, field: str) -> str:
    """``clean_text(value)``, or a ``missing_field`` RowError naming ``field`` when it is empty."""
    text = clean_text(value)
    if not text:
        raise RowError(field, "empty or missing", "missing_field")
    return text


def _is_cjk(ch: str) -> bool:
    return "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf"


def detect_lang(text: str) -> str:
    """'zh' when CJK ideographs make up at least a fifth of the letters, else 'en'."""
    letters = [c for c in text if c.isalpha()]
    if not letters:
        return "en"
    return "zh" if sum(map(_is_cjk, letters)) / len(letters) >= 0.2 else "en"


def looks_chinese(text: str) -> bool:
    """Whether the non-ASCII characters are mostly CJK (a check on a GB18030 fallback decode)."""
    non_ascii = [c for c in text if ord(c) > 127]
    if not non_ascii:
        return True
    ok = sum(1 for c in non_ascii
             if _is_cjk(c) or unicodedata.category(c)[0] in "PSZ" or "\uff00" <= c <= "\uffef")
    return ok / len(non_ascii) >= 0.8


_OPTION_LINE = re.compile(r"^\s*([A-J])\s*(?:[.．、:：)）]\s*|\s+|$)(.*)$", re.S)


def parse_option_lines(text: str, field: str = "Options") -> dict[str, str]:
    """Options written one per line as ``"A text"`` / ``"A. text"`` / ``"A、text"`` (CMExam).

    A line that does not start with a letter continues the previous option.
    """
    options: dict[str, str] = {}
    last = None
    for line in clean_text(text).split("\n"):
        m = _OPTION_LINE.match(line)
        if m and OPTION_LETTERS.index(m.group(1)) == len(options):  # the next letter in order
            last = m.group(1)
            options[last] = m.group(2).strip()
        elif last is not None and line.strip():
            options[last] += "\n" + line.strip()
        elif line.strip():
            raise RowError(field, f"option line {line[:40]!r} does not start with a letter A-J",
                           "bad_options")
    return check_options(options, field)


def check_options(options: dict[str, Any], field: str = "options") -> dict[str, str]:
    """Options keyed A, B, C... in order, at least two, none empty; empty trailing slots dropped.

    Raises:
        RowError: naming ``field`` when the letters skip, repeat or an option is empty.
    """
    cleaned = {str(k).strip().upper(): clean_text(v) for k, v in options.items()
               if v is not None and clean_text(v) != ""}
    letters = "".join(cleaned)
    if len(cleaned) < 2:
        raise RowError(field, f"expected at least two options, got {len(cleaned)}", "bad_options")
    if letters != OPTION_LETTERS[: len(letters)]:
        raise RowError(field, f"option letters should run A, B, C... without gaps, got {letters!r}",
                       "bad_options")
    return cleaned


def parse_answer(raw: Any, options: dict[str, str], field: str = "answer") -> str:
    """Answer letters, validated against the options and returned sorted (``"ABD"``).

    Accepts ``"ABD"``, ``"A,B,D"``, ``"A、B"``, ``"a b"``.

    Raises:
        RowError: ``bad_answer`` when empty or when a letter is not among the options.
    """
    text = clean_text(raw)
    letters = re.sub(r"[\s,，、;；/|+]", "", text).upper()
    if not letters:
        raise RowError(field, "empty answer", "bad_answer")
    bad = "".join(c for c in letters if c not in options)
    if bad:
        given = f" (answer {text!r})" if text != bad else ""
        raise RowError(field, f"{bad!r} is not among the options {next(iter(options))}-"
                              f"{list(options)[-1]}{given}", "bad_answer")
    return "".join(sorted(set(letters)))


def normalize_for_dedup(text: str) -> str:
    """NFKC, case-folded, all whitespace removed: two texts that differ only in width, case or
    spacing count as the same."""
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text).casefold())


def content_key(record: dict) -> str:
    """The normalised text of a record (all messages, or question + options + answer): equal
    keys mean duplicate records, whatever their ids and meta."""
    if "messages" in record:
        parts = [f"{m['role']}:{m['content']}" for m in record["messages"]]
    else:
        parts = [record["question"], *(f"{k}:{v}" for k, v in record["options"].items()),
                 record["answer"]]
    return normalize_for_dedup("\x1f".join(parts))


def make_id(source: str, split: str, *parts: Any) -> str:
    """Stable record id ``<source>-<split>-<part>...``; empty parts are left out, whitespace
    becomes underscores."""
    return "-".join(re.sub(r"\s+", "_", str(p).strip()) for p in (source, split, *parts)
                    if str(p).strip() != "")


def mcq_record(rid: str, question: Any, options: dict[str, str], answer: str, *, source: str,
               subject: str, lang: str, label: str | None = None, explanation: Any = None,
               question_field: str = "question", **meta: Any) -> dict:
    """An MCQ record; ``explanation`` is kept only when non-empty."""
    record = {"id": rid, "question": require_text(question, question_field), "options": options,
              "answer": answer}
    expl = clean_text(explanation)
    if expl:
        record["explanation"] = expl
    record["meta"] = _meta(source=source, task="mcq", lang=lang, subject=subject, label=label,
                           **meta)
    return record


def chat_record(rid: str, turns: list[tuple[str, str]], *, source: str, task: str, lang: str,
                label: str | None = None, system: str | None = None, **meta: Any) -> dict:
    """A chat record from ``(user, assistant)`` turns whose texts are already checked."""
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"id": rid, "messages": messages,
            "meta": _meta(source=source, task=task, lang=lang, label=label, **meta)}


def _meta(label: str | None, **meta: Any) -> dict:
    out = {k: v for k, v in meta.items() if v is not None and v != ""}
    if label:
        out["label"] = label
    return out
