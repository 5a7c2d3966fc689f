"""sparsedoc.checkpoint: a stopped-and-resumed run reproduces the uninterrupted one exactly, and
interrupted saves or missing paths are never taken for checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparsedoc.checkpoint import list_checkpoints, resolve_resume
from sparsedoc.logging import read_metrics

REPO = Path(__file__).resolve().parents[1]


def _train_lora(tiny_model_dir, toy_data, out_dir, *extra, method="lora") -> None:
    train, evals = toy_data
    script = ([str(REPO / "recipes" / "train_lora.py")] if method == "lora" else
              ["-m", "sparsedoc.recipes.train", "--method", method,
               "adapter.sensitivity.calibration_batches=1"])
    cmd = [sys.executable, *script,
           f"model.name_or_path={tiny_model_dir}", f"data.train_files=[{train}]",
           f"data.eval_files=[{evals}]", f"train.output_dir={out_dir}", "train.max_steps=6",
           "train.micro_batch_size=4", "train.eval_every=2", "train.log_every=1",
           "logging.wandb=false", *extra]  # adapter.lora.dropout stays at 0.05 (lora_demo.yaml)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _by_step(rows, key):
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "sensitivity_lora"])
def test_stop_and_resume_gives_the_same_losses(tiny_model_dir, toy_data, tmp_path, method):
    """Sensitivity-LoRA's resume reads its rank map back from the checkpoint."""
    from safetensors.torch import load_file

    a, b = tmp_path / "a", tmp_path / "b"
    _train_lora(tiny_model_dir, toy_data, a, method=method)
    _train_lora(tiny_model_dir, toy_data, b, "train.stop_at=3", method=method)
    assert [p.name for p in list_checkpoints(b)] == ["step-000003"]
    assert json.loads((b / "summary.json").read_text())["steps"] == 3
    _train_lora(tiny_model_dir, toy_data, b, "train.resume_from=auto", method=method)
    if method == "sensitivity_lora":
        map_a = json.loads((a / "rank_map.json").read_text())
        assert json.loads((b / "rank_map.json").read_text())["ranks"] == map_a["ranks"]
        assert json.loads((b / "summary.json").read_text())["rank_map"]["params"] == sum(
            r * sum(map_a["shapes"][n]) for n, r in map_a["ranks"].items())

    rows_a, rows_b = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert yaml.safe_load((b / "config.yaml").read_text())["adapter"]["lora"]["dropout"] == 0.05
    steps_b = [r["step"] for r in rows_b if "train/loss" in r]
    assert steps_b == [1, 2, 3, 4, 5, 6]  # no duplicated (or missing) steps after the resume
    loss_a, loss_b = _by_step(rows_a, "train/loss"), _by_step(rows_b, "train/loss")
    assert sorted(loss_a) == [1, 2, 3, 4, 5, 6]
    for step in (4, 5, 6):
        assert loss_b[step] == loss_a[step], (step, loss_b[step], loss_a[step])
    for step in (1, 2, 3):  # the first leg is the same run up to the stop
        assert loss_b[step] == loss_a[step], (step, loss_b[step], loss_a[step])
    # the same weights: held-out losses and the final adapter agree bit for bit
    eval_a, eval_b = _by_step(rows_a, "eval/loss"), _by_step(rows_b, "eval/loss")
    assert sorted(eval_b) == sorted(eval_a) == [0, 2, 4, 6]
    assert eval_b == eval_a
    assert eval_a[6] != eval_a[0]  # training moved the weights
    ad_a = load_file(a / "checkpoints" / "step-000006" / "adapter" / "adapter_model.safetensors")
    ad_b = load_file(b / "checkpoints" / "step-000006" / "adapter" / "adapter_model.safetensors")
    assert ad_a.keys() == ad_b.keys()
    for k in ad_a:
        assert (ad_a[k] == ad_b[k]).all(), k
    assert json.loads((b / "summary.json").read_text())["steps"] == 6


def _fake_checkpoint(root: Path, name: str, complete: bool) -> Path:
    d = root / "checkpoints" / name
    d.mkdir(parents=True)
    (d / "rng_state_rank0.pt").write_bytes(b"")
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"step": int(name.split("-")[-1])}))
    return d


def test_auto_resume_ignores_a_crashed_save(tmp_path):
    real = _fake_checkpoint(tmp_path, "step-000004", complete=True)
    # a crash mid-save: the temp folder of a later step, and a later step folder with no state
    _fake_checkpoint(tmp_path, "tmp-step-000006", complete=True)
    _fake_checkpoint(tmp_path, "step-000008", complete=False)
    assert resolve_resume("auto", tmp_path) == real
    assert list_checkpoints(tmp_path) == [real]


def test_auto_resume_picks_the_highest_step_not_the_last_name(tmp_path):
    _fake_checkpoint(tmp_path, "step-000009", complete=True)
    latest = _fake_checkpoint(tmp_path, "step-000010", complete=True)
    assert resolve_resume("auto", tmp_path) == latest


def test_auto_resume_without_checkpoints_starts_fresh(tmp_path):
    assert resolve_resume("auto", tmp_path) is None
    assert resolve_resume("", tmp_path) is None


def test_resume_from_a_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        resolve_resume("/nonexistent", tmp_path)
    assert "/nonexistent" in str(e.value) and "trainer_state.json" in str(e.value)
    incomplete = _fake_checkpoint(tmp_path, "tmp-step-000002", complete=False)
    with pytest.raises(FileNotFoundError, match="not a complete sparsedoc checkpoint"):
        resolve_resume(str(incomplete), tmp_path)
