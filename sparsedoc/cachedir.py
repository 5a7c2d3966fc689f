"""Build a reusable cache folder once, however many processes ask for it at the same time.

Every caller takes an inter-process lock on ``<target>.lock`` before it looks at the folder, so
when several ranks start on an empty cache one builds and the others wait, then reuse its result.
A folder is only ever moved into place whole (built in a temp sibling, checked, renamed), and an
existing folder is trusted only if ``check`` passes: one left broken by a crash or by an older
version is rebuilt instead of failing every later run.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout

log = logging.getLogger(__name__)


def cache_home() -> Path:
    """sparsedoc's cache folder: ``$SPARSEDOC_CACHE``, else ``$XDG_CACHE_HOME/sparsedoc``
    (``~/.cache/sparsedoc``). Converted models and tokenized data live under it."""
    root = os.environ.get("SPARSEDOC_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "sparsedoc")
    return Path(root)


def build_once(target: Path, build: Callable[[Path], None], check: Callable[[Path], str | None],
               what: str) -> Path:
    """Return ``target``, building it first with ``build(empty folder)`` unless it is complete.

    ``check(folder)`` returns ``None`` for a complete folder, else the reason it is not."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    # flock is released by the kernel when its holder dies, so a lock file left behind by a killed
    # process is just an unlocked file: it never blocks anyone and needs no cleanup.
    lock = FileLock(str(target) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info("waiting for another process to finish building %s in %s", what, target)
        lock.acquire()
    try:
        return _build_locked(target, build, check, what)
    finally:
        lock.release()


def _build_locked(target: Path, build: Callable[[Path], None],
                  check: Callable[[Path], str | None], what: str) -> Path:
    if target.exists() or target.is_symlink():
        reason = check(target)
        if reason is None:
            return target
        log.warning("rebuilding %s in %s: %s", what, target, reason)
        aside = target.with_name(f"{target.name}.old-{os.getpid()}")
        os.replace(target, aside)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f"{target.name}.tmp-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is a normal folder
        build(tmp)
        reason = check(tmp)
        if reason is not None:
            raise RuntimeError(f"building {what} in {target} gave an incomplete folder: {reason}")
        try:
            os.replace(tmp, target)
        except OSError:  # a process that takes no lock (an older sparsedoc) got there first
            if not target.is_dir() or check(target) is not None:
                raise
    finally:
        _remove_leftovers(target)
    return target


def _remove_leftovers(target: Path) -> None:
    """Delete the temp and set-aside siblings of ``target``: under the lock no one else is
    building, so any there are ours or debris of a builder that died."""
    for p in target.parent.iterdir():
        if p.name.startswith((f"{target.name}.tmp-", f"{target.name}.old-")):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
