"""What a checkpoint records about the run that wrote it, and the check a resume makes.

A resume is exact only with the same world size, micro-batch, accumulation and training data:
any of them changes the data order, the RNG streams or ZeRO's optimizer partitioning. Such a
resume is refused with a message naming what changed, unless ``train.resume_allow_changes``;
with it, the run logs what will differ. Other config changes (learning rate, schedule, ...) are
logged, not refused: they are what a user resuming on purpose changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from sparsedoc.config import Config, config_to_dict, flatten
from sparsedoc.errors import UserError
from sparsedoc.fsio import file_sha256
from sparsedoc.resources import resolve_path

log = logging.getLogger("sparsedoc")

# config keys that may change between the legs of one run without changing what it computes
VOLATILE_KEYS = {"train.resume_from", "train.stop_at", "train.output_dir", "train.save_every",
                 "train.keep_last", "train.eval_every", "train.eval_batches", "train.log_every",
                 "train.resume_allow_changes", "train.max_consecutive_skips",
                 "data.num_workers", "data.tokenize_cache", "data.num_proc", "data.cache_dir",
                 "logging"}
REFUSED = {"world_size": "world size", "micro_batch_size": "train.micro_batch_size",
           "grad_accum": "train.grad_accum", "data_hash": "training data (files and data.*)"}


class ResumeMismatch(UserError, ValueError):
    """A checkpoint saved under settings that would make the resume inexact."""


def _kept(key: str) -> bool:
    return not any(key == v or key.startswith(v + ".") for v in VOLATILE_KEYS)


def config_hash(cfg: Config | dict) -> str:
    flat = flatten(cfg if isinstance(cfg, dict) else config_to_dict(cfg))
    kept = {k: v for k, v in flat.items() if _kept(k)}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def data_hash(cfg: Config, manifests: list[Path]) -> str:
    """SHA-256 of the training files' bytes, their data manifests and the data settings that
    shape the rows (the eval split's own files do not count, ``eval_fraction`` does)."""
    h = hashlib.sha256()
    for f in [*cfg.data.train_files, *manifests]:
        h.update(file_sha256(resolve_path(f)).encode())  # read once: the tokenize cache too
    data = {k: v for k, v in config_to_dict(cfg)["data"].items()
            if k not in ("train_files", "eval_files", "num_workers",  # the rows are the same
                         "tokenize_cache", "num_proc", "cache_dir")}
    h.update(json.dumps(data, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def run_record(cfg: Config, world_size: int, data_digest: str) -> dict:
    """The fields every checkpoint's ``trainer_state.json`` carries for the check."""
    return {"world_size": world_size, "micro_batch_size": cfg.train.micro_batch_size,
            "grad_accum": cfg.train.grad_accum, "data_hash": data_digest,
            "config_hash": config_hash(cfg)}


@dataclass
class ResumePlan:
    """What a resume restores: everything, or (after an accepted change) less."""

    changes: list[str]
    load_optimizer: bool = True  # False: ZeRO cannot re-partition the optimizer state
    samples_per_batch_saved: int = 0  # global samples per micro-batch when saved (0: unchanged)


def check_resume(saved: dict, now: dict, allow: bool, ckpt: Path, zero: int,
                 saved_config: dict | None, config_now: dict) -> ResumePlan:
    """Compare a checkpoint's ``trainer_state.json`` (``saved``) with this run (``now``,
    ``run_record``); refuse a change that makes the resume inexact unless ``allow``.

    Raises:
        ResumeMismatch: names each change and the override.
    """
    missing = [k for k in REFUSED if k not in saved]
    if missing:
        log.warning("%s predates the resume checks (no %s recorded): resuming unchecked",
                    ckpt, ", ".join(missing))
    changed = [f"{label} {saved[k]} -> {now[k]}" for k, label in REFUSED.items()
               if k in saved and saved[k] != now[k]]
    world_changed = "world_size" in saved and saved["world_size"] != now["world_size"]
    plan = ResumePlan(changed, load_optimizer=not world_changed)
    if world_changed or saved.get("micro_batch_size", now["micro_batch_size"]) \
            != now["micro_batch_size"]:
        plan.samples_per_batch_saved = (int(saved.get("micro_batch_size",
                                                      now["micro_batch_size"]))
                                        * int(saved.get("world_size", now["world_size"])))
    if changed and not allow:
        raise ResumeMismatch(
            f"cannot resume from {ckpt}: {'; '.join(changed)}. The run would not continue as "
            f"it would have uninterrupted (data order, RNG streams"
            f"{', ZeRO optimizer partitioning' if world_changed else ''} differ). Resume with "
            f"the settings it was saved with, or set train.resume_allow_changes=true to resume "
            f"anyway")
    if changed and world_changed and zero == 3:
        raise ResumeMismatch(
            f"cannot resume from {ckpt} on a different world size ({changed[0]}) under ZeRO-3: "
            f"its weights live in the per-rank shards, which DeepSpeed cannot re-partition. "
            f"Resume on {saved['world_size']} ranks, or consolidate the checkpoint first "
            f"(zero_to_fp32.py) and start a new run from it")
    if changed:
        log.warning("resuming from %s although %s (train.resume_allow_changes=true). What will "
                    "differ from the uninterrupted run: the data order from here on, the RNG "
                    "streams%s; the position in the epoch is kept in samples seen%s", ckpt,
                    "; ".join(changed),
                    " (ranks without a saved RNG state reseed)" if world_changed else "",
                    "; the optimizer state (Adam moments) starts afresh because ZeRO cannot "
                    "re-partition it (weights and LR schedule are restored)"
                    if world_changed else "")
    if saved.get("config_hash") and saved["config_hash"] != now["config_hash"]:
        diff = _config_diff(saved_config or {}, config_now)
        log.warning("resuming with a changed config%s", ": " + "; ".join(diff) if diff else "")
    return plan


def _config_diff(old: dict, new: dict) -> list[str]:
    a, b = flatten(old), flatten(new)
    return [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if _kept(k) and a.get(k) != b.get(k)][:12]
