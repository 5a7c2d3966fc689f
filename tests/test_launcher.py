"""The real `deepspeed` launcher (2 CPU ranks) running the LoRA and full fine-tune recipes under
ZeRO-2 and ZeRO-3 on a tiny Llama, and one W&B offline run; every result is read back from disk."""

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


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                        "WANDB_DIR")}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _overrides(tiny_model_dir, toy_data, out_dir, max_steps) -> list[str]:
    train, evals = toy_data
    return [f"model.name_or_path={tiny_model_dir}", f"data.train_files=[{train}]",
            f"data.eval_files=[{evals}]", f"train.output_dir={out_dir}",
            f"train.max_steps={max_steps}", "train.micro_batch_size=4", "train.log_every=1"]


def _run(cmd: list[str], env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, \
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    return proc


# Full fine-tuning runs under ZeRO-3 only: that is where its parameters are sharded and gathered
# for the export; ZeRO-2 adds no path of its own to the full recipe that LoRA does not cover.
@pytest.mark.parametrize("ds,recipe", [("zero2.json", "train_lora.py"),
                                       ("zero3.json", "train_lora.py"),
                                       ("zero3.json", "train_full.py")])
def test_recipe_trains_under_the_deepspeed_launcher(tiny_model_dir, toy_data, tmp_path, recipe,
                                                    ds):
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
           "--master_port", str(free_port()), str(REPO / "recipes" / recipe),
           "--ds", str(REPO / "ds_configs" / ds),
           *_overrides(tiny_model_dir, toy_data, out, max_steps=3), "logging.wandb=false"]
    _run(cmd, _env())

    rows = read_metrics(out / "metrics.jsonl")
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    for r in train_rows:
        assert math.isfinite(r["train/loss"]) and r["train/loss"] > 0, r
        assert math.isfinite(r["train/grad_norm"]), r
    evals = {r["step"]: r["eval/loss"] for r in rows if "eval/loss" in r}
    assert sorted(evals) == [0, 3] and all(math.isfinite(v) for v in evals.values())

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["steps"] == 3
    assert summary["method"] == recipe.removeprefix("train_").removesuffix(".py")
    assert summary["eval_loss_final"] == evals[3]
    ds_used = json.loads((out / "ds_config.json").read_text())
    assert ds_used["train_batch_size"] == 4 * 1 * 2
    assert ds_used["zero_optimization"]["stage"] == (3 if ds == "zero3.json" else 2)

    ckpt = out / "checkpoints" / "step-000003"
    assert Path(summary["final_checkpoint"]).resolve() == ckpt.resolve()
    assert (ckpt / "rng_state_rank0.pt").is_file() and (ckpt / "rng_state_rank1.pt").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["world_size"] == 2
    assert (out / "checkpoints" / "latest").read_text() == "step-000003"
    assert not list((out / "checkpoints").glob("tmp-*"))

    if recipe == "train_lora.py":
        from safetensors.torch import load_file

        adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
        a = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"]
        b = adapter["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
        # gathered from the ZeRO-3 shards: full shapes, real values (not empty placeholders)
        assert tuple(a.shape) == (8, 64) and tuple(b.shape) == (64, 8)
        assert a.abs().sum() > 0 and b.abs().sum() > 0  # B starts at 0: it trained
        assert len(adapter) == 2 * 7 * 2
        for name, t in adapter.items():
            assert t.numel() > 0 and t.abs().sum() > 0, name
    if ds == "zero3.json":
        _check_export(out, ckpt, recipe, tiny_model_dir, tmp_path / "export")


def _check_export(run, ckpt, recipe, tiny_model_dir, out):
    """The run exports to a plain HF folder whose logits, loaded by stock transformers, equal
    the trained model's, rebuilt here from the checkpoint by hand: DeepSpeed's own
    consolidation of the ZeRO-3 shards for the full fine-tune, peft for the LoRA adapter."""
    import torch
    from test_export import _logits, _stock_logits
    from transformers import AutoModelForCausalLM

    from sparsedoc.export import export

    meta = export(run, out)
    assert meta["mode"] == "merged" and meta["step"] == 3 and meta["verification"]["passed"]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    base_logits = _logits(base)
    if recipe == "train_full.py":
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
        base.load_state_dict(state, strict=False)
        trained = base
    else:
        from peft import PeftModel

        trained = PeftModel.from_pretrained(base, str(ckpt / "adapter")).eval()
    got = _stock_logits(out, expect_class="LlamaForCausalLM")
    for ref, exp, untrained in zip(_logits(trained), got, base_logits):
        torch.testing.assert_close(exp, ref, atol=1e-4, rtol=1e-4)
        assert (ref - untrained).abs().max() > 1e-4  # three steps moved the weights


def test_wandb_offline_run_is_written_into_the_run_folder(tiny_model_dir, toy_data, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "recipes" / "train_lora.py"),
           *_overrides(tiny_model_dir, toy_data, out, max_steps=2),
           "logging.wandb=true", "logging.mode=offline", "train.eval_every=0"]
    _run(cmd, _env(WANDB_MODE="offline", WANDB_SILENT="true"))

    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, list((out / "wandb").rglob("*"))
    assert b"train/loss" in runs[0].read_bytes()
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2]
    # the W&B run id is kept in the checkpoint so a resume continues the same run
    state = json.loads((out / "checkpoints" / "step-000002" / "trainer_state.json").read_text())
    assert state["wandb_id"] and runs[0].name == f"run-{state['wandb_id']}.wandb"


def test_sensitivity_lora_trains_under_the_deepspeed_launcher(tiny_model_dir, toy_data, tmp_path):
    """Both ranks estimate the same rank map (the same seeded calibration sample, the
    ZeRO-3 shards gathered for it), train with it, and the map is what the adapter holds.
    ZeRO-3 only: the calibration's one stage-specific path is the gathering of shards."""
    ds = "zero3.json"
    from safetensors.torch import load_file

    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
           "--master_port", str(free_port()), "--module", "sparsedoc.recipes.train",
           "--method", "sensitivity_lora", "--ds", str(REPO / "ds_configs" / ds),
           *_overrides(tiny_model_dir, toy_data, out, max_steps=3), "logging.wandb=false",
           "adapter.lora.r=4", "adapter.sensitivity.calibration_batches=1"]
    _run(cmd, _env())

    rows = read_metrics(out / "metrics.jsonl")
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "sensitivity_lora" and summary["world_size"] == 2
    assert 0 < summary["calibration_share"] < 1 and summary["calibration_seconds"] > 0
    assert any("calibration/seconds" in r for r in rows)
    rank_map = json.loads((out / "rank_map.json").read_text())
    assert (out / "rank_map.png").stat().st_size > 0
    ckpt = out / "checkpoints" / "step-000003"  # (the warm-up's first steps run at lr 0)
    assert json.loads((ckpt / "rank_map.json").read_text())["ranks"] == rank_map["ranks"]
    assert summary["trainable_params"] == sum(r * sum(rank_map["shapes"][n])
                                              for n, r in rank_map["ranks"].items())
    adapter = load_file(ckpt / "adapter" / "adapter_model.safetensors")
    for name, r in rank_map["ranks"].items():
        a = adapter[f"base_model.model.{name}.lora_A.weight"]
        b = adapter[f"base_model.model.{name}.lora_B.weight"]
        assert a.shape[0] == r and b.shape[1] == r and b.abs().sum() > 0, name  # full, trained
    if ds == "zero3.json":
        _check_export(out, ckpt, "train_lora.py", tiny_model_dir, tmp_path / "export")
