"""Checkpoints: DeepSpeed state for exact resume, plus an adapter-only safetensors copy.

Layout of one checkpoint (``<output_dir>/checkpoints/step-000050/``)::

    <DeepSpeed files>          engine, optimizer, scheduler and ZeRO shards (DeepSpeed's format)
    rng_state_rank<N>.pt       CPU/CUDA RNG of every rank (dropout, jitter) for an exact resume
    trainer_state.json         step, epoch, position in the epoch, W&B run id
    adapter/                   trainable weights only, gathered from ZeRO-3 shards (safetensors)
    config.yaml                the resolved run config

Writes go to ``tmp-step-000050`` and are renamed when every rank has finished, so a crash
mid-save never leaves a folder that ``resume_from=auto`` would pick.
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


def save_checkpoint(engine, output_dir: str | Path, step: int, trainer_state: dict, rank: int,
                    save_adapter, write_extras, exclude_frozen: bool, keep_last: int) -> Path:
    """Collective: every rank must call it. Returns the final checkpoint folder.

    Args:
        save_adapter: ``fn(dir)`` writing the adapter-only weights; called on every rank because
            gathering ZeRO-3 shards is collective (it writes on rank 0 only).
        write_extras: ``fn(dir)`` called on rank 0 for config, plots and the like.
    """
    root = checkpoint_root(output_dir)
    final = root / step_dirname(step)
    tmp_tag = "tmp-" + step_dirname(step)
    tmp = root / tmp_tag
    if is_main():
        shutil.rmtree(tmp, ignore_errors=True)  # debris of an earlier crash at this step
    barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, save_latest=False,
                           exclude_frozen_parameters=exclude_frozen)
    save_rng_state(tmp, rank)
    save_adapter(tmp / "adapter")
    barrier()
    if is_main():
        write_extras(tmp)
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        # DeepSpeed's own tools (zero_to_fp32.py) find the newest tag through this file.
        fsio.write_text(root / LATEST, final.name)
        _rotate(output_dir, keep_last)
    barrier()
    return final


def _rotate(output_dir: str | Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    for old in list_checkpoints(output_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(engine, ckpt_dir: Path, rank: int, exclude_frozen: bool) -> dict:
    """Restore engine, optimizer, scheduler and RNG; return the trainer state. The folder is
    checked first (complete, no torch file that could run code: ``sparsedoc.safeload``) and
    DeepSpeed's loads run weights-only."""
    state = json.loads((ckpt_dir / TRAINER_STATE).read_text())
    why = deepspeed_files_problem(ckpt_dir)
    if why:
        raise ArtifactError(f"{ckpt_dir}: cannot resume, {why}")
    check_torch_files(ckpt_dir)
    # The folder was renamed after saving: point DeepSpeed at the new name, not the temp tag.
    with weights_only_loads():
        load_path, _ = engine.load_checkpoint(str(ckpt_dir.parent), tag=ckpt_dir.name,
                                              load_module_strict=not exclude_frozen)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir}")
    load_rng_state(ckpt_dir, rank)
    return state
