"""Faults inflicted for real on 2-rank `deepspeed` LoRA-MoE runs (tiny Llama, CPU, gloo):
SIGTERM to one rank, SIGKILL mid-save and mid-step, NaN losses, a resume on another world size.
Each interrupted run is resumed with ``resume_from=auto`` and compared with an uninterrupted one:
the same losses, the same adapter bits, the same routing telemetry."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from sparsedoc.checkpoint import list_checkpoints
from sparsedoc.distributed import free_port
from sparsedoc.logging import read_metrics
from sparsedoc.train.faults import FAULT_ENV, NONFINITE_EXIT, PREEMPTED_EXIT

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
STEPS = 6
# collapse_threshold below the balanced share (top-2 of 4: 0.5) so the collapse counter runs
# from the first logged step on: a resume that forgot it would be seen at once
MOE = ["adapter.moe.collapse_threshold=0.3", "adapter.moe.collapse_patience=3",
       "adapter.moe.queue_size=8"]


def _command(tiny_model_dir, toy_data, out, ranks=2, extra=()) -> list[str]:
    train, evals = toy_data
    launch = ([str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
               "--master_port", str(free_port())] if ranks > 1 else [sys.executable])
    return [*launch, str(REPO / "recipes" / "train_moe.py"), "--ds",
            str(REPO / "ds_configs" / "zero2.json"), f"model.name_or_path={tiny_model_dir}",
            f"data.train_files=[{train}]", f"data.eval_files=[{evals}]",
            f"train.output_dir={out}", f"train.max_steps={STEPS}", "train.micro_batch_size=4",
            "train.log_every=1", "train.eval_every=0", "train.save_every=2", "train.keep_last=2",
            "logging.wandb=false", *MOE, *extra]


def _env(fault: str = "") -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        FAULT_ENV)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if fault:
        env[FAULT_ENV] = fault
    return env


def _run(cmd, fault="", expect=0) -> str:
    proc = subprocess.run(cmd, cwd=REPO, env=_env(fault), capture_output=True, text=True,
                          timeout=400)
    out = proc.stdout + proc.stderr
    assert (proc.returncode == expect if expect is not None else proc.returncode != 0), \
        f"exit {proc.returncode}\n{out[-5000:]}"
    return out


def _losses(run: Path, key="train/loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in read_metrics(run / "metrics.jsonl") if key in r}


def _adapter(ckpt: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(ckpt / "adapter" / "adapter_model.safetensors")


@pytest.fixture(scope="module")
def reference(tiny_model_dir, toy_data, tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    out = tmp_path_factory.mktemp("reference") / "run"
    _run(_command(tiny_model_dir, toy_data, out))
    return out


def _same_as_reference(run: Path, reference: Path, from_step: int) -> None:
    got, want = _losses(run), _losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))  # no step logged twice, none missing
    for step in range(from_step, STEPS + 1):
        assert got[step] == want[step], (step, got[step], want[step])
    final = f"step-{STEPS:06d}"
    a, b = _adapter(run / "checkpoints" / final), _adapter(reference / "checkpoints" / final)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    # routing telemetry: the collapse counter ran on across the resumes as it did in one go
    for rank in (0, 1):
        name = f"method_state_rank{rank}.json"
        got_t = json.loads((run / "checkpoints" / final / name).read_text())["routing_stats"]
        want_t = json.loads((reference / "checkpoints" / final / name).read_text())
        assert got_t == want_t["routing_stats"]
        assert got_t["collapsed_for"] == STEPS  # counted from step 1, not from the resume
    assert _losses(run, "moe/collapse") == _losses(reference, "moe/collapse")


def _rank_pid(launcher: subprocess.Popen, rank: int, timeout: float = 120) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for p in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if f"--local_rank={rank}" in p.cmdline():
                    return p.pid
            except psutil.Error:
                pass
        time.sleep(0.2)
    raise AssertionError(f"rank {rank} never started")


def test_sigterm_and_sigkills_then_resume_gives_the_uninterrupted_run(
        tiny_model_dir, toy_data, tmp_path, reference):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"

    # 1. SIGTERM to rank 1 only, mid-training: both ranks stop at the same step, save, and the
    #    launcher exits with the preemption code
    cmd = _command(tiny_model_dir, toy_data, run)
    launcher = subprocess.Popen(cmd, cwd=REPO, env=_env("slow@*:s=0.6"), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    rank1 = _rank_pid(launcher, 1)
    while not (run / "metrics.jsonl").is_file() or not _losses(run):
        assert launcher.poll() is None, launcher.stdout.read()[-5000:]
        time.sleep(0.1)
    os.kill(rank1, signal.SIGTERM)
    log, _ = launcher.communicate(timeout=300)
    assert launcher.returncode == PREEMPTED_EXIT, log[-5000:]
    stopped = [p.name for p in list_checkpoints(run)][-1]
    at = int(stopped.split("-")[1])
    assert 1 <= at <= 3, log[-3000:]
    assert f"stopped at step {at}: preemption notice (SIGTERM on rank 1)" in log
    assert "train.resume_from=auto" in log
    assert json.loads((ckpts / stopped / "trainer_state.json").read_text())["step"] == at
    assert not (run / "summary.json").exists()  # not finished: auto resume continues it
    assert max(_losses(run)) == at

    # 2. resumed, then SIGKILLed mid-save at step 4 (DeepSpeed's files written, not renamed)
    log = _run(cmd + ["train.resume_from=auto"], "kill@4:at=save:rank=0", expect=None)
    assert f"resumed from {ckpts / stopped} at step {at}" in log
    half = ckpts / "tmp-step-000004"
    assert any(half.glob("*model_states.pt")) and not (ckpts / "step-000004").exists()
    newest = list_checkpoints(run)[-1]  # step 2 if the SIGTERM stopped at 1, else unchanged

    # 3. resumed: the half-written step 4 is never picked; SIGKILLed mid-step (after the
    #    forward of step 5, before its backward) on rank 1
    log = _run(cmd + ["train.resume_from=auto"], "kill@5:at=step:rank=1", expect=None)
    assert f"resumed from {newest} at step {int(newest.name.split('-')[1])}" in log
    assert "SIGKILL at step of step 5" in log
    assert (ckpts / "step-000004" / "trainer_state.json").is_file()

    # 4. resumed from step 4, runs to the end: the uninterrupted run's losses and weights
    log = _run(cmd + ["train.resume_from=auto"])
    assert f"resumed from {ckpts / 'step-000004'} at step 4" in log
    _same_as_reference(run, reference, from_step=1)
    assert [p.name for p in list_checkpoints(run)] == ["step-000004", "step-000006"]  # keep_last
    assert not list(ckpts.glob("tmp-*")) and not list(ckpts.glob("deleting-*"))


def test_nan_losses_are_skipped_on_every_rank_and_repeated_ones_stop_the_run(
        tiny_model_dir, toy_data, tmp_path):
    run = tmp_path / "run"
    # attempt 2: NaN out of decoder layer 0 on rank 1 only; attempts 4 and 5: on both ranks
    fault = "nan@2:rank=1:module=model.layers.0;nan@4-9:module=model.layers.0"
    log = _run(_command(tiny_model_dir, toy_data, run, extra=["train.max_consecutive_skips=2"]),
               fault, expect=NONFINITE_EXIT)
    first = ("step 2: non-finite lm, balance, z, contrast loss on rank(s) 1 (first non-finite "
             "layer: model.layers.1.self_attn.q_proj); the micro-batch is skipped on every rank "
             "(1 skipped in total, 1 in a row of at most 2)")
    for rank in (0, 1):  # both ranks report it
        assert f"[rank{rank}]" in log and any(
            line.startswith(f"[rank{rank}]") and line.endswith(first)
            for line in log.splitlines()), log[-5000:]
    assert "on rank(s) 0, 1" in log  # the repeated ones, on both ranks
    # attempt 3 was step 2, good; attempts 4, 5 were skipped: stop at step 2 with a checkpoint
    assert "stopped at step 2: 2 non-finite steps in a row (train.max_consecutive_skips=2)" in log
    state = json.loads((run / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["skipped_steps"] == 3
    losses = _losses(run)
    assert sorted(losses) == [1, 2] and all(v == v for v in losses.values())  # no NaN logged
    assert _losses(run, "train/skipped_total")[2] == 1
    assert not (run / "summary.json").exists()


def test_resume_on_another_world_size_is_refused_unless_overridden(
        tiny_model_dir, toy_data, tmp_path, reference):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference / "checkpoints" / "step-000004", run / "checkpoints" / "step-000004")
    one_rank = _command(tiny_model_dir, toy_data, run, ranks=1, extra=["train.resume_from=auto"])
    log = _run(one_rank, expect=2)
    assert "cannot resume from" in log and "world size 2 -> 1" in log
    assert "train.resume_allow_changes=true" in log
    assert not (run / "metrics.jsonl").exists()  # refused before the run folder was written

    log = _run(one_rank + ["train.resume_allow_changes=true"])
    assert "although world size 2 -> 1" in log and "Adam moments" in log
    assert f"resumed from {run / 'checkpoints' / 'step-000004'} at step 4" in log
    assert sorted(_losses(run)) == [5, 6]
    assert json.loads((run / "summary.json").read_text())["world_size"] == 1
