"""Tokenize a set of data files once, into an Arrow table that every rank memory-maps.

A million-record SFT set tokenized in Python lists costs minutes on every start of every rank
and a full copy in each rank's memory. Here the tokenized records of a file set are written once
(``datasets.map`` with ``num_proc`` workers) to a folder named by a hash of everything that
decides them: the files' bytes, the tokenizer and its chat template, and the tokenize settings.
``cachedir.build_once`` makes one process build it while the others wait on a file lock, and
only a complete folder is ever moved into place, so a stale or half-written cache is never read.
A hit costs hashing the files plus a memory map.

Every record keeps a row, skipped ones included (with the reason), so row ``i`` is record ``i``
of the files in order: the held-out split and the data report come out of the columns exactly
as the in-memory path (``tokenize.tokenize_records``) computes them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from sparsedoc.cachedir import build_once, cache_home
from sparsedoc.fsio import file_sha256
from sparsedoc.data.schema import RecordError, iter_jsonl, resolve_path, routing_label
from sparsedoc.data.tokenize import (IGNORE_INDEX, TokenizedExample, TokenizeStats, fit_chat,
                                     require_chat_template, to_chat)
from sparsedoc.errors import MissingFile

log = logging.getLogger(__name__)

CACHE_FORMAT = 1  # bump when the columns or the tokenize rules change
COMPLETE = "tokenized.json"  # written last into the folder: its presence means complete


@dataclass(frozen=True)
class TokenizeSettings:
    """Everything besides the files and the tokenizer that decides the tokenized rows."""

    max_seq_len: int
    max_target_len: int = 0
    system_prompt: str = ""
    mcq_with_explanation: bool = True
    encoding: str = "utf-8"


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what the tokenizer turns text into: its vocabulary and rules (the fast
    tokenizer's serialised form, else the vocabulary), special tokens and chat template."""
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps({"chat_template": tokenizer.chat_template,
                         "special": tokenizer.special_tokens_map,
                         "class": type(tokenizer).__name__},
                        sort_keys=True, default=str).encode())
    return h.hexdigest()


def cache_key(files: list[str], tokenizer, settings: TokenizeSettings) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"format": CACHE_FORMAT, "settings": asdict(settings)},
                        sort_keys=True).encode())
    for f in files:
        path = resolve_path(f)
        if not path.is_file():
            raise MissingFile(f"{path}: no such data file")
        h.update(file_sha256(path).encode())
    h.update(tokenizer_fingerprint(tokenizer).encode())
    return h.hexdigest()[:24]


def _record_lines(files: list[str], encoding: str):
    """Each record of ``files`` as one JSON string, in order, validated (``iter_jsonl``);
    a duplicate id within a file is refused as ``read_jsonl`` does."""
    for f in files:
        seen: dict[str, int] = {}
        for i, rec in enumerate(iter_jsonl(f, encoding=encoding)):
            if rec.get("id") in seen:
                raise RecordError(f"{f}: duplicate id {rec['id']!r} (records {seen[rec['id']] + 1} "
                                  f"and {i + 1})")
            seen[rec.get("id")] = i
            yield {"record": json.dumps(rec, ensure_ascii=False)}


def _tokenize_batch(batch: dict, tokenizer, settings: dict) -> dict:
    out = {k: [] for k in ("input_ids", "labels", "label", "record_label", "record_id", "skip",
                           "shortened", "turns_dropped", "turn_cut", "n_target", "length")}
    for line in batch["record"]:
        rec = json.loads(line)
        chat = to_chat(rec, settings["mcq_with_explanation"])
        fit = fit_chat(tokenizer, chat["messages"], settings["max_seq_len"],
                       settings["max_target_len"], settings["system_prompt"])
        n_target = sum(1 for x in fit.labels[1:] if x != IGNORE_INDEX)
        skip = fit.skip or ("" if n_target else "no target token")
        out["input_ids"].append([] if skip else fit.input_ids)
        out["labels"].append([] if skip else fit.labels)
        out["label"].append(routing_label(chat))
        out["record_label"].append(routing_label(rec))
        out["record_id"].append(rec["id"])
        out["skip"].append(skip)
        out["shortened"].append(bool(fit.shortened) and not skip)
        out["turns_dropped"].append(0 if skip else fit.turns_dropped)
        out["turn_cut"].append(bool(fit.turn_cut) and not skip)
        out["n_target"].append(0 if skip else n_target)
        out["length"].append(0 if skip else len(fit.input_ids))
    return out


def _build(folder: Path, files: list[str], tokenizer, settings: TokenizeSettings,
           num_proc: int) -> None:
    import datasets

    log.info("tokenizing %s once into %s (%d processes)", ", ".join(files), folder, num_proc or 1)
    scratch = folder / ".scratch"  # datasets' own intermediate cache files, deleted below
    raw = datasets.Dataset.from_generator(
        _record_lines, gen_kwargs={"files": list(files), "encoding": settings.encoding},
        cache_dir=str(scratch), keep_in_memory=False)
    tokenized = raw.map(_tokenize_batch, batched=True, batch_size=256, num_proc=num_proc or None,
                        remove_columns=["record"], desc="tokenize",
                        fn_kwargs={"tokenizer": tokenizer, "settings": asdict(settings)},
                        cache_file_name=str(scratch / "tokenized.arrow"),
                        new_fingerprint=folder.name)
    tokenized.save_to_disk(str(folder / "rows"))
    del raw, tokenized
    shutil.rmtree(scratch, ignore_errors=True)
    (folder / COMPLETE).write_text(json.dumps({"format": CACHE_FORMAT, "files": list(files),
                                               "settings": asdict(settings)}, indent=2))


def _check(folder: Path) -> str | None:
    marker = folder / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} (an interrupted build)"
    try:
        if json.loads(marker.read_text()).get("format") != CACHE_FORMAT:
            return "written by another cache format"
    except json.JSONDecodeError:
        return f"{COMPLETE} is not JSON"
    if not (folder / "rows" / "dataset_info.json").is_file():
        return "rows/ is incomplete"
    return None


def default_cache_root() -> Path:
    return cache_home() / "tokenized"


class TokenizedRows(Sequence):
    """The kept (not skipped) rows of a cached table, in record order, as ``TokenizedExample``s
    read from the memory map on access; ``lengths`` without reading the token lists."""

    def __init__(self, table, indices):
        self.table = table  # a datasets.Dataset, memory-mapped
        self.indices = indices  # numpy int64: row numbers of the table

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self.table[int(self.indices[i])]
        return TokenizedExample(row["input_ids"], row["labels"], row["label"], row["record_id"])

    def lengths(self) -> list[int]:
        return self.table.data.column("length").take(self.indices).to_pylist()


@dataclass
class CachedFiles:
    """The cached tables of a file list, concatenated: every record a row, in file order."""

    table: object  # datasets.Dataset, memory-mapped
    folders: list[Path]
    rows_per_file: list[int]

    def __len__(self) -> int:
        return self.table.num_rows

    def _rows(self, records):
        import numpy as np

        return (np.arange(len(self)) if records is None
                else np.asarray(records, dtype=np.int64))

    def kept(self, records=None) -> TokenizedRows:
        """The rows that were not skipped, among ``records`` (row numbers; all by default)."""
        skip = self.table.data.column("skip").to_numpy(zero_copy_only=False)
        rows = self._rows(records)
        return TokenizedRows(self.table, rows[skip[rows] == ""])

    def stats(self, records=None) -> TokenizeStats:
        """The data report ``tokenize_records`` gives for the same records."""
        cols = {c: self.table.data.column(c).to_numpy(zero_copy_only=False)
                for c in ("skip", "shortened", "turns_dropped", "turn_cut", "n_target", "length")}
        rows = self._rows(records)
        skipped = rows[cols["skip"][rows] != ""]
        ids = self.table.data.column("record_id").take(skipped).to_pylist()
        return TokenizeStats(records=len(rows), truncated=int(cols["shortened"][rows].sum()),
                             turns_dropped=int(cols["turns_dropped"][rows].sum()),
                             turns_cut=int(cols["turn_cut"][rows].sum()),
                             skipped=dict(zip(ids, cols["skip"][skipped].tolist())),
                             tokens=int(cols["length"][rows].sum()),
                             target_tokens=int(cols["n_target"][rows].sum()))

    def column(self, name: str, records=None) -> list:
        col = self.table.data.column(name)
        return (col if records is None else col.take(self._rows(records))).to_pylist()


def tokenized_file(file: str, tokenizer, settings: TokenizeSettings, num_proc: int = 0,
                   cache_root: str | os.PathLike = "") -> Path:
    """The cache folder of ``file``'s tokenized rows, built first unless an identical one is
    there (another process building it is waited for)."""
    root = Path(cache_root) if cache_root else default_cache_root()
    key = cache_key([file], tokenizer, settings)
    return build_once(root / key, lambda tmp: _build(tmp, [file], tokenizer, settings, num_proc),
                      _check, f"the tokenized rows of {file}")


def tokenized_files(files: list[str], tokenizer, settings: TokenizeSettings, num_proc: int = 0,
                    cache_root: str | os.PathLike = "") -> CachedFiles:
    """The tokenized rows of ``files`` from the cache, one cached table per file (a file shared
    by two mixtures is tokenized once)."""
    import datasets

    require_chat_template(tokenizer)
    folders = [tokenized_file(f, tokenizer, settings, num_proc, cache_root) for f in files]
    tables = [datasets.load_from_disk(str(folder / "rows")) for folder in folders]
    table = tables[0] if len(tables) == 1 else datasets.concatenate_datasets(tables)
    log.info("tokenized rows of %d records from the cache (%s)", table.num_rows,
             ", ".join(str(f) for f in folders))
    return CachedFiles(table, folders, [t.num_rows for t in tables])
