"""Readers that survive real release formats, and the ``Row`` they produce.

Every reader records the file it opened (hash, encoding actually used, line endings) on the
``Context`` so the report and manifest can say exactly what was converted, and turns a row it
cannot parse into a ``Row`` carrying a ``RowError`` instead of raising: the runner then counts
and reports it (or stops under ``--strict``). File-level problems (unreadable, empty, wrong
encoding, missing column, not JSON) raise ``ConvertError`` naming the file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparsedoc.prep.records import RowError, looks_chinese

# Quoted fields of real files can exceed csv's default 128 KiB limit (full encounter transcripts).
csv.field_size_limit(1 << 30)

class ConvertError(Exception):
    """A problem that stops a conversion; the message names the file (and row/line/field)."""


@dataclass
class Row:
    """One raw source record and where it came from; ``error`` is set if it could not be parsed."""

    where: str
    data: Any = None
    index: int = 0  # 0-based position in its file, used for ids when the source has none
    key: str | None = None  # the id a source keys its records by (PubMedQA PMID), if any
    file: str = ""
    tag: str = ""  # set when a split is read from several files: keeps row-index ids unique
    error: RowError | None = None


@dataclass
class SourceFile:
    """An input file as read: hash for provenance, the encoding actually used, its shape."""

    path: str
    sha256: str
    bytes: int
    encoding: str | None = None
    line_endings: str | None = None
    format: str | None = None
    records: int = 0


def split_from_name(name: str) -> str | None:
    """Normalised split name (train/validation/dev/test) read from a file or folder name."""
    low = name.lower()
    if "train" in low:
        return "train"
    if "valid" in low or re.search(r"(^|[^a-z])val([^a-z]|$)", low):
        return "validation"
    if re.search(r"(^|[^a-z])dev([^a-z]|$)", low):
        return "dev"
    if "test" in low:
        return "test"
    return None


def _line_endings(text: str) -> str:
    crlf, lf = text.count("\r\n"), text.count("\n")
    return "none" if lf == 0 else "CRLF" if crlf == lf else "LF" if crlf == 0 else "mixed"


@dataclass
class Context:
    """Conversion state shared with a converter's reader: options, and every file it opened."""

    src: Path | None
    hf: str | None = None
    seed: int = 0
    encodings: tuple[str, ...] = ("utf-8-sig",)
    files: list[SourceFile] = field(default_factory=list)
    ignored: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def rel(self, path: Path) -> str:
        """``path`` relative to the source root, for messages."""
        if self.src is None:
            return str(path)
        root = self.src if self.src.is_dir() else self.src.parent
        try:
            return str(Path(path).relative_to(root))
        except ValueError:
            return str(path)

    def ignore(self, path: Path, reason: str) -> None:
        """Note a file found under ``src`` that is deliberately not converted."""
        self.ignored.append({"path": self.rel(path), "reason": reason})

    def read_bytes(self, path: Path) -> tuple[bytes, SourceFile]:
        """The bytes of ``path``; unreadable or empty files are a ``ConvertError``."""
        rel = self.rel(path)
        try:
            raw = Path(path).read_bytes()
        except OSError as e:
            raise ConvertError(f"{rel}: cannot read file: {e.strerror or e}") from None
        if not raw.strip():
            raise ConvertError(f"{rel}: file is empty ({len(raw)} bytes)")
        info = SourceFile(rel, hashlib.sha256(raw).hexdigest(), len(raw))
        self.files.append(info)
        return raw, info

    def read_text(self, path: Path) -> tuple[str, SourceFile]:
        """Decoded text: the first of ``encodings`` that works; the one used is recorded."""
        raw, info = self.read_bytes(path)
        errors = []
        for i, enc in enumerate(self.encodings):
            try:
                text = raw.decode(enc)
            except LookupError:
                raise ConvertError(f"unknown text encoding {enc!r}") from None
            except UnicodeDecodeError as e:
                line = raw[: e.start].count(b"\n") + 1
                errors.append(f"{enc}: byte 0x{raw[e.start]:02x} at offset {e.start} (line {line})")
                continue
            if i > 0 and not looks_chinese(text):  # a fallback decode must look like Chinese
                errors.append(f"{enc}: decodes, but the text is not Chinese")
                continue
            info.line_endings = _line_endings(text)
            info.encoding = ("utf-8" if enc == "utf-8-sig" and not raw.startswith(b"\xef\xbb\xbf")
                             else enc)
            return text, info
        hint = ("it starts with a UTF-16 byte-order mark: pass --encoding utf-16"
                if raw[:2] in (b"\xff\xfe", b"\xfe\xff") else "is it in another encoding? "
                                                                "pass --encoding")
        raise ConvertError(f"{info.path}: cannot decode the file ({'; '.join(errors)}); {hint}")

    def read_csv(self, path: Path, required: tuple[str, ...], aliases: dict[str, str] | None = None
                 ) -> list[Row]:
        """Rows of a CSV file as dicts keyed by header, parsed as records (never line by line).

        Quoted fields may hold newlines; a raw ``"`` inside an unquoted field is kept as text.
        A malformed row (bad quoting, wrong field count, unterminated quote at the end of a
        truncated file) becomes a ``Row`` with an ``error``.

        Raises:
            ConvertError: unreadable/empty/undecodable file, or a required column is missing.
        """
        text, info = self.read_text(path)
        info.format = "csv"
        reader = csv.reader(io.StringIO(text, newline=""), strict=True)
        try:
            header = [h.strip().lstrip("\ufeff") for h in next(reader)]
        except csv.Error as e:
            raise ConvertError(f"{info.path}: line 1: cannot parse the CSV header: {e}") from None
        header = [(aliases or {}).get(h, h) for h in header]
        dupes = sorted({h for h in header if h and header.count(h) > 1})
        if dupes:
            raise ConvertError(f"{info.path}: duplicate column(s) {dupes} in the header")
        missing = [c for c in required if c not in header]
        if missing:
            raise ConvertError(f"{info.path}: missing column(s) {', '.join(map(repr, missing))}; "
                               f"the header has {header}")
        rows: list[Row] = []
        while True:
            start = reader.line_num + 1
            where = f"{info.path}: row {len(rows) + 1} (line {start})"
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                msg = ("unterminated quoted field (truncated file?)"
                       if "unexpected end of data" in str(e) else f"malformed CSV: {e}")
                rows.append(Row(where, index=len(rows), file=info.path,
                                error=RowError(None, msg, "malformed_row")))
                continue
            if not fields:  # a blank line carries no record
                continue
            if len(fields) != len(header):
                err = RowError(None, f"expected {len(header)} fields as in the header, got "
                                     f"{len(fields)}", "malformed_row")
                rows.append(Row(where, index=len(rows), file=info.path, error=err))
                continue
            rows.append(Row(where, dict(zip(header, fields)), index=len(rows), file=info.path))
        info.records = len(rows)
        return rows

    def read_records(self, path: Path) -> list[Row]:
        """Records of a JSON array, a ``{"data": [...]}`` wrapper, an object keyed by id, or
        JSON Lines, whatever the file extension says (BenTsao's ``.json`` is JSON Lines).

        Raises:
            ConvertError: unreadable/empty/undecodable file, or neither JSON nor JSON Lines.
        """
        text, info = self.read_text(path)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as e:
            head = [line for line in text.splitlines() if line.strip()][:5]
            if e.msg != "Extra data" and not any(_is_object(line) for line in head):
                raise ConvertError(f"{info.path}: not valid JSON or JSON Lines ({e.msg} at line "
                                   f"{e.lineno} column {e.colno})") from None
            rows = self._jsonl_rows(text, info)
        else:
            rows = self._doc_rows(doc, info)
        info.records = len(rows)
        return rows

    @staticmethod
    def _jsonl_rows(text: str, info: SourceFile) -> list[Row]:
        info.format = "jsonl"
        rows = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{info.path}: line {lineno}"
            try:
                rows.append(Row(where, json.loads(line), index=lineno - 1, file=info.path))
            except json.JSONDecodeError as e:
                err = RowError(None, f"not valid JSON ({e.msg} at column {e.colno})",
                               "malformed_row")
                rows.append(Row(where, index=lineno - 1, file=info.path, error=err))
        return rows

    @staticmethod
    def _doc_rows(doc: Any, info: SourceFile) -> list[Row]:
        if isinstance(doc, dict) and isinstance(doc.get("data"), list) and len(doc) == 1:
            doc = doc["data"]
        if isinstance(doc, list):
            info.format = "json-array"
            return [Row(f"{info.path}: item {i}", item, index=i, file=info.path)
                    for i, item in enumerate(doc)]
        if isinstance(doc, dict) and doc and all(isinstance(v, dict) for v in doc.values()):
            info.format = "json-object-by-id"
            return [Row(f"{info.path}: key {k!r}", v, index=i, key=str(k), file=info.path)
                    for i, (k, v) in enumerate(doc.items())]
        info.format = "json-object"
        return [Row(f"{info.path}: item 0", doc, file=info.path)]


def _is_object(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except json.JSONDecodeError:
        return False


def find_files(src: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Files under ``src`` (or ``src`` itself) with one of ``suffixes``, sorted by path.

    Raises:
        ConvertError: ``src`` does not exist or holds no such file.
    """
    src = Path(src)
    if not src.exists():
        raise ConvertError(f"{src}: no such file or directory")
    if src.is_file():
        return [src]
    found = sorted(p for p in src.rglob("*") if p.is_file() and p.suffix.lower() in suffixes
                   and not any(part.startswith(".") for part in p.relative_to(src).parts))
    if not found:
        raise ConvertError(f"{src}: no {'/'.join(suffixes)} files found")
    return found


def load_hf(hf_id: str, config: str | None = None) -> dict[str, list[Row]]:
    """Rows of a Hugging Face hub dataset, per normalised split name, via ``datasets``.

    Raises:
        ConvertError: ``datasets`` missing or the dataset cannot be loaded (e.g. no network).
    """
    try:
        from datasets import load_dataset
    except ImportError as e:
        raise ConvertError(f"--hf needs the 'datasets' package: {e}") from None
    name = f"{hf_id}" + (f" (config {config!r})" if config else "")
    try:
        dsd = load_dataset(hf_id, config) if config else load_dataset(hf_id)
    except Exception as e:  # network, auth, missing config: all end the run with one message
        raise ConvertError(f"could not load {name} from the Hugging Face hub: "
                           f"{type(e).__name__}: {e}") from None
    out: dict[str, list[Row]] = {}
    for split_name, ds in dsd.items():
        split = split_from_name(split_name) or split_name
        tag = f"hf:{hf_id}" + (f"/{config}" if config else "") + f"[{split_name}]"
        out.setdefault(split, []).extend(
            Row(f"{tag} row {i}", dict(ex), index=i, file=tag) for i, ex in enumerate(ds))
    return out
