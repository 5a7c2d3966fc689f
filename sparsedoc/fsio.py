"""Atomic writes: a reader (or a crash) sees the old file or the new one, never half of one;
and the one file digest (``file_sha256``) every content key is built from.

Every writer of a file that something else reads back (configs, summaries, scores, reports,
resume caches) goes through here. A leaf module: it imports nothing from sparsedoc, so any layer
may use it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks. Remembered per (path, size, mtime) for
    the life of the process: a run's start hashes its data files for the tokenize cache and for
    the resume record, and a million-record file is read once, not twice."""
    st = os.stat(path)
    return _sha256_of(os.path.abspath(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _temp_next_to(path: Path) -> Path:
    """A fresh temp file in ``path``'s folder (same filesystem, so the rename is atomic); the
    name is unique per process and call, so two ranks writing one file never share it."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    return Path(name)


def write_with(path: str | os.PathLike, write: Callable[[Any], None], mode: str = "w") -> None:
    """Call ``write(f)`` on a temp file beside ``path`` and rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_next_to(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            write(f)
        tmp.chmod(0o644)  # mkstemp makes it private; these are ordinary output files
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    write_with(path, lambda f: f.write(text))


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    write_with(path, lambda f: f.write(data), mode="wb")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2,
               default: Callable[[Any], Any] | None = None) -> None:
    """JSON, UTF-8 as is (``ensure_ascii=False``: Chinese stays readable), newline-terminated."""
    write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=default) + "\n")


def write_lines(path: str | os.PathLike, lines: Iterable[str]) -> None:
    """One string per line (each gets its newline), streamed: large files are never joined."""
    def write(f):
        for line in lines:
            f.write(line + "\n")
    write_with(path, write)


def save_figure(fig, path: str | os.PathLike, **kwargs) -> None:
    """``fig.savefig`` into a temp file of the same suffix, then renamed."""
    path = Path(path)
    write_with(path, lambda f: fig.savefig(f, format=path.suffix.lstrip(".") or "png", **kwargs),
               mode="wb")


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished folder ``new`` to ``target``. An existing ``target`` is set aside first
    and deleted last, so a crash in between leaves the old folder or the new, never a mixture."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(new, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
