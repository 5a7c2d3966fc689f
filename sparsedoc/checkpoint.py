"""Checkpoints: DeepSpeed state for exact resume, plus an adapter-only safetensors copy.

Layout of one checkpoint (``<output_dir>/checkpoints/step-000050/``)::

    <DeepSpeed files>          engine, optimizer, scheduler and ZeRO shards (DeepSpeed's format)
    rng_state_rank<N>.pt       CPU/CUDA RNG of every rank (dropout, jitter) for an exact resume
    method_state_rank<N>.json  the method's own per-rank state (LoRA-MoE: routing telemetry)
    trainer_state.json         step, epoch, position in the epoch, W&B run id, skip counts, and
                               what the resume check compares (world size, micro-batch,
                               accumulation, data and config hashes)
    adapter/                   trainable weights only, gathered from ZeRO-3 shards (safetensors)
    config.yaml                the resolved run config

Writes go to ``tmp-step-000050`` and are renamed when every rank has finished, so a crash
mid-save never leaves a folder that ``resume_from=auto`` would pick. Old checkpoints beyond
``train.keep_last`` are deleted only after the new one is complete, and are first renamed to
``deleting-step-*`` so a crash mid-delete never leaves a half-deleted folder that looks complete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from sparsedoc import fsio
from sparsedoc.artifacts import (LATEST, TRAINER_STATE, ArtifactError, deepspeed_files_problem,
                                 is_checkpoint, latest_checkpoint,
                                 list_checkpoints)  # noqa: F401 (re-exported)
from sparsedoc.distributed import barrier, is_main
from sparsedoc.safeload import check_torch_files, weights_only_loads


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_dirname(step: int) -> str:
    return f"step-{step:06d}"


def resolve_resume(resume_from: str, output_dir: str | Path) -> Path | None:
    """``auto`` -> the latest complete checkpoint (None if there is none); a path -> itself."""
    if not resume_from:
        return None
    if resume_from == "auto":
        return latest_checkpoint(output_dir)
    path = Path(resume_from)
    if not is_checkpoint(path):
        raise ArtifactError(f"train.resume_from={resume_from}: not a complete sparsedoc "
                            f"checkpoint (no trainer_state.json)")
    return path


def save_rng_state(ckpt_dir: Path, rank: int) -> None:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    torch.save(state, ckpt_dir / f"rng_state_rank{rank}.pt")


def load_rng_state(ckpt_dir: Path, rank: int) -> None:
    path = ckpt_dir / f"rng_state_rank{rank}.pt"
    if not path.is_file():  # e.g. resuming on a different world size: reseed from the step
        return
    state = torch.load(path, weights_only=True)
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def rank_state_name(rank: int) -> str:
    return f"method_state_rank{rank}.json"


def read_rank_state(ckpt_dir: Path, rank: int) -> dict | None:
    """This rank's ``method_state_rank<N>.json`` (rank 0's when this rank has none, e.g. after
    a change of world size, flagged with ``"from_rank": 0``; None when neither exists)."""
    for r in (rank, 0):
        path = ckpt_dir / rank_state_name(r)
        if path.is_file():
            state = json.loads(path.read_text(encoding="utf-8"))
            return state if r == rank else {**state, "from_rank": 0}
    return None


def save_checkpoint(engine, output_dir: str | Path, step: int, trainer_state: dict, rank: int,
                    save_adapter, write_extras, exclude_frozen: bool, keep_last: int,
                    rank_state: dict | None = None, midway=None) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint folder.

    Args:
        save_adapter: ``fn(dir)`` writing the adapter-only weights; called on every rank because
            gathering ZeRO-3 shards is collective (it writes on rank 0 only).
        write_extras: ``fn(dir)`` called on rank 0 for config, plots and the like.
        rank_state: this rank's JSON-able extra state (``method_state_rank<N>.json``).
        midway: ``fn()`` called once DeepSpeed's files are written, before the checkpoint is
            complete (fault injection in tests).
    """
    root = checkpoint_root(output_dir)
    final = root / step_dirname(step)
    tmp_tag = "tmp-" + step_dirname(step)
    tmp = root / tmp_tag
    if is_main() and root.is_dir():
        # debris of earlier crashes: temp folders of unfinished saves, interrupted deletions
        for old in [*root.glob("tmp-step-*"), *root.glob("deleting-step-*")]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False,
                           exclude_frozen_parameters=exclude_frozen)
    save_rng_state(tmp, rank)
    if rank_state is not None:
        (tmp / rank_state_name(rank)).write_text(json.dumps(rank_state), encoding="utf-8")
    if midway is not None:
        midway()
    save_adapter(tmp / "adapter")
    barrier()
    if is_main():
        write_extras(tmp)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():  # saved at this step before (a resumed stop_at): out of the way first
            shutil.rmtree(root / ("deleting-" + final.name), ignore_errors=True)
            os.replace(final, root / ("deleting-" + final.name))
        os.replace(tmp, final)
        shutil.rmtree(root / ("deleting-" + final.name), ignore_errors=True)
        # DeepSpeed's own tools (zero_to_fp32.py) find the newest tag through this file.
        fsio.write_text(root / LATEST, final.name)
        _rotate(output_dir, keep_last)
    barrier()
    return final


def _rotate(output_dir: str | Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep_last]:
        gone = old.with_name("deleting-" + old.name)  # one rename: never seen half-deleted
        shutil.rmtree(gone, ignore_errors=True)
        os.replace(old, gone)
        shutil.rmtree(gone, ignore_errors=True)


def read_trainer_state(ckpt_dir: Path) -> dict:
    """``trainer_state.json`` of a checkpoint (JSON: nothing in it can run code)."""
    try:
        state = json.loads((ckpt_dir / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{ckpt_dir / TRAINER_STATE}: cannot read it ({e})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ArtifactError(f"{ckpt_dir / TRAINER_STATE}: expected an object with an integer "
                            f"'step'")
    return state


def load_checkpoint(engine, ckpt_dir: Path, rank: int, exclude_frozen: bool,
                    load_optimizer: bool = True) -> dict:
    """Restore engine, optimizer, scheduler and RNG; return the trainer state. The folder is
    checked first (complete, no torch file that could run code: ``sparsedoc.safeload``) and
    DeepSpeed's loads run weights-only. ``load_optimizer=False`` restores weights and the LR
    schedule only (a resume on another world size: ZeRO cannot re-partition the optimizer)."""
    state = read_trainer_state(ckpt_dir)
    why = deepspeed_files_problem(ckpt_dir)
    if why:
        raise ArtifactError(f"{ckpt_dir}: cannot resume, {why}")
    check_torch_files(ckpt_dir)
    # The folder was renamed after saving: point DeepSpeed at the new name, not the temp tag.
    with weights_only_loads():
        load_path, _ = engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name,
                                              load_module_strict=not exclude_frozen,
                                              load_optimizer_states=load_optimizer)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir}")
    load_rng_state(ckpt_dir, rank)
    return state
