"""The real `deepspeed` launcher, 2 CPU ranks, running recipes/train_moe.py on a tiny Llama."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsedoc.logging import read_metrics
from sparsedoc.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def launch_moe(tiny_model_dir, toy_data, out_dir, ds="zero2.json", ranks=2, extra=()):
    train, evals = toy_data
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks),
           "--master_port", str(free_port()), str(REPO / "recipes" / "train_moe.py"),
           "--ds", str(REPO / "ds_configs" / ds),
           f"model.name_or_path={tiny_model_dir}", f"data.train_files=[{train}]",
           f"data.eval_files=[{evals}]", f"train.output_dir={out_dir}", "train.max_steps=4",
           "train.micro_batch_size=4", "train.log_every=1", "train.eval_every=2",
           "train.save_every=2", "logging.wandb=false", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return read_metrics(Path(out_dir) / "metrics.jsonl")


def losses_by_step(rows, key="train/loss"):
    return {r["step"]: r[key] for r in rows if key in r}


LABEL_RUN = ["adapter.moe.contrastive=label", "adapter.moe.queue_size=8"]


@pytest.fixture(scope="module")
def label_run(tiny_model_dir, toy_data, tmp_path_factory) -> Path:
    """The uninterrupted ZeRO-2 run with the label contrast: checked as a run of its own, and
    the reference the resumed run must reproduce."""
    out = tmp_path_factory.mktemp("moe-label") / "run"
    launch_moe(tiny_model_dir, toy_data, out, "zero2.json", extra=LABEL_RUN)
    return out


@pytest.mark.parametrize("ds", ["zero2.json", "zero3.json"])
def test_moe_trains_under_deepspeed(tiny_model_dir, toy_data, tmp_path, ds, request):
    if ds == "zero2.json":  # label contrast, shared with the resume test
        run = request.getfixturevalue("label_run")
        rows = read_metrics(run / "metrics.jsonl")
    else:
        run = tmp_path / "run"
        rows = launch_moe(tiny_model_dir, toy_data, run, ds,
                          extra=["adapter.moe.contrastive=expert"])
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for r in train_rows:
        for key in ("train/loss", "train/lm_loss", "moe/balance_loss", "moe/z_loss",
                    "moe/contrastive_loss", "moe/routing_entropy", "moe/busiest_expert_share",
                    "moe/layers_over_threshold"):
            assert math.isfinite(r[key]), (key, r)
        loads = [v for k, v in r.items() if k.startswith("moe/load/layer00/")]
        assert len(loads) == 4 and sum(loads) == pytest.approx(1.0)
        assert r["moe/queue_ranks_in_sync"] == 1.0  # both ranks hold the same queues
    assert train_rows[-1]["moe/contrastive_anchors"] > 0  # the queue supplied positives
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    ckpt = run / "checkpoints" / "step-000004"
    assert (ckpt / "routing_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from safetensors.torch import load_file
    adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    a = adapter["model.layers.0.self_attn.q_proj.lora_A"]
    assert tuple(a.shape) == (4, 8, 64) and a.abs().sum() > 0  # gathered, not an empty shard
    # routers were calibrated before step 1 (unit mean-input direction, saved with the adapter)
    u = adapter["model.layers.0.self_attn.q_proj.router.shared_direction"]
    assert float(u.norm()) == pytest.approx(1.0, abs=1e-5)


def test_moe_resume_reproduces_losses_and_queue(tiny_model_dir, toy_data, tmp_path, label_run):
    extra = LABEL_RUN
    full = losses_by_step(read_metrics(label_run / "metrics.jsonl"))
    launch_moe(tiny_model_dir, toy_data, tmp_path / "b", extra=extra + ["train.stop_at=2"])
    rows = launch_moe(tiny_model_dir, toy_data, tmp_path / "b",
                      extra=extra + ["train.resume_from=auto"])
    resumed = losses_by_step(rows)
    assert sorted(resumed) == [1, 2, 3, 4]  # no duplicated steps after the resume
    for step in (3, 4):
        assert resumed[step] == full[step], (step, resumed[step], full[step])
    contrast = losses_by_step(rows, "moe/contrastive_loss")
    contrast_full = losses_by_step(read_metrics(label_run / "metrics.jsonl"),
                                   "moe/contrastive_loss")
    assert contrast[3] == contrast_full[3]  # the restored queue gives the same contrast


def test_ffn_expert_moe_trains_under_zero3_and_exports_as_mixtral(tiny_model_dir, toy_data,
                                                                  tmp_path):
    """FFN-expert mode (MixLoRA-style) under ZeRO-3 on 2 ranks with the expert-output contrast,
    then one command turns the run folder into a stock Mixtral checkpoint that verifies."""
    import torch
    from test_export import _logits, _stock_logits

    from sparsedoc.loader import load_trained
    from sparsedoc.export import export

    rows = launch_moe(tiny_model_dir, toy_data, tmp_path / "run", "zero3.json",
                      extra=["adapter.moe.mode=ffn", "adapter.moe.contrastive=expert"])
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for r in train_rows:
        for key in ("train/lm_loss", "moe/balance_loss", "moe/contrastive_loss"):
            assert math.isfinite(r[key]), (key, r)
        assert len([k for k in r if k.startswith("moe/load/layer01/")]) == 4
        assert r["moe/queue_ranks_in_sync"] == 1.0
    meta = export(tmp_path / "run", tmp_path / "mixtral")
    assert meta["mode"] == "mixtral" and meta["step"] == 4 and meta["verification"]["passed"]
    trained, _, _ = load_trained(str(tmp_path / "run"), dtype="fp32", device="cpu")
    got = _stock_logits(tmp_path / "mixtral", expect_class="MixtralForCausalLM")
    for a, b in zip(_logits(trained), got):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
