"""Per-item prediction cache and the batched loop every scorer runs through.

An interrupted evaluation resumes where it stopped: each finished batch's predictions are
appended (and flushed) to ``<eval dir>/.cache/<task>.<scorer>.<key>.jsonl``, where the key
hashes everything that changes a prediction (model weights, data file, prompt settings, decoding
settings). A different key is a different file, so stale predictions are never reused. Two
evaluations of the same thing may run at once: each batch is appended under a lock on
``<file>.lock``, so their lines never interleave (rows both computed are just written twice).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

from filelock import FileLock
from tqdm.auto import tqdm


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


class PredictionCache:
    """Append-only JSONL of ``{"id": ..., **prediction}``; ``path=None`` caches nothing."""

    def __init__(self, path: str | Path | None):
        self.path = Path(path) if path else None
        self.done: dict[str, dict] = {}
        if self.path and self.path.is_file():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a line cut by a crash mid-write: recompute it
                    continue
                self.done[row["id"]] = row
        self._f = None
        self._lock = FileLock(str(self.path) + ".lock") if self.path else None

    def add(self, rows: list[dict]) -> None:
        for r in rows:
            self.done[r["id"]] = r
        if self.path is None:
            return
        if self._f is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = self.path.open("a", encoding="utf-8")
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        with self._lock:  # the file is opened for appending: each write lands at its current end
            self._f.write(text)
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def run_batched(ids: list[str], lengths: list[int], fn: Callable[[list[int]], list[dict]],
                batch_size: int, cache: PredictionCache | None = None, desc: str = "",
                progress: bool = True) -> tuple[list[dict], int]:
    """Run ``fn`` over the indices of items not yet cached, longest first (less padding, and an
    out-of-memory batch shows up at once), and return ``(predictions in item order, number
    taken from the cache)``. ``fn(indices)`` returns one dict per index."""
    cache = cache or PredictionCache(None)
    todo = [i for i in range(len(ids)) if ids[i] not in cache.done]
    reused = len(ids) - len(todo)
    todo.sort(key=lambda i: -lengths[i])
    bar = tqdm(total=len(ids), initial=reused, desc=desc, disable=not progress, leave=False,
               dynamic_ncols=True)
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            preds = fn(chunk)
            cache.add([{"id": ids[i], **p} for i, p in zip(chunk, preds)])
            bar.update(len(chunk))
    finally:
        bar.close()
        cache.close()
    return [{k: v for k, v in cache.done[i].items() if k != "id"} for i in ids], reused
