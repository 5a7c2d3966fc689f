"""The wheel is enough: built from this checkout, installed (not editable) into a fresh venv, and
run from a folder outside the checkout, it trains, evaluates and exports a tiny random model.

The venv gets the same torch as this one first (so pip pulls no other build), then the wheel
with its declared dependencies: a dependency the code needs but the wheel does not declare
fails here. Slow: the install alone takes a minute or two with a warm pip cache.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch

from sparsedoc.distributed import free_port

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
EXTENSIONS = Path(tempfile.gettempdir()) / "sparsedoc-wheel-test-torch-extensions"


def _run(cmd: list, cwd: Path, timeout: int = 900, env: dict | None = None) -> str:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env or _env())
    assert proc.returncode == 0, (f"{' '.join(map(str, cmd))} exited {proc.returncode}\n"
                                  f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc.stdout


def _env() -> dict:
    """No path from this checkout or this venv leaks into the child. DeepSpeed JIT-builds its
    CPU ops per install path: the wheel's venv builds into a folder of its own, so it does not
    invalidate (and make every later test rebuild) this venv's build."""
    drop = ("PYTHONPATH", "VIRTUAL_ENV", "RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
            "MASTER_PORT", "WANDB_DIR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_MODE": "offline",
            "HF_HUB_OFFLINE": "1", "TORCH_EXTENSIONS_DIR": str(EXTENSIONS)}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
          "-w", dist, REPO], cwd=dist)
    (whl,) = dist.glob("sparsedoc-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(tmp_path_factory, wheel) -> Path:
    root = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", root / "venv"], cwd=root)
    py = root / "venv" / "bin" / "python"
    _run([py, "-m", "pip", "install", "-q", f"torch=={torch.__version__.split('+')[0]}"],
         cwd=root)
    _run([py, "-m", "pip", "install", "-q", wheel], cwd=root)
    return root / "venv" / "bin"


def test_wheel_ships_recipes_configs_and_demo_data_but_no_generic_top_level(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for need in ["sparsedoc/recipes/train_moe.py", "sparsedoc/recipes/configs/moe_demo.yaml",
                 "sparsedoc/recipes/configs/llama3_8b_moe.yaml", "sparsedoc/ds_configs/zero2.json",
                 "sparsedoc/ds_configs/zero3.json", "sparsedoc/prep/demo/train.jsonl",
                 "sparsedoc/prep/demo/eval.jsonl", "sparsedoc/prep/cmexam.py",
                 "sparsedoc/prep/mixtures/medical_sft.yaml"]:
        assert need in names, need
    tops = {n.split("/")[0] for n in names if not n.startswith("sparsedoc-")}
    assert tops == {"sparsedoc"}, tops


def test_installed_wheel_trains_evaluates_and_exports_outside_the_checkout(
        venv, tiny_model_dir, toy_data, tmp_path):
    """One training run (the wheel's own DeepSpeed ops build once, in it): the `deepspeed`
    launcher of the venv, started by module on 2 ranks, on the demo data that ships inside the
    wheel (the default config's data paths); then evaluate and export that run."""
    user = tmp_path / "user"  # a folder with nothing of the checkout in it
    user.mkdir()
    where = _run([venv / "python", "-c", "import sparsedoc; print(sparsedoc.__file__)"], user)
    assert str(venv.parent) in where and str(REPO) not in where, where
    version = _run([venv / "sparsedoc", "--version"], user).strip()
    assert version == "sparsedoc " + _run(
        [sys.executable, "-c", "import sparsedoc; print(sparsedoc.__version__)"], REPO).strip()

    _run([venv / "sparsedoc", "train", "lora_moe", "--gpus", "2",
          f"--launcher={venv / 'deepspeed'} --num_gpus 2 --master_port {free_port()}",
          "--ds", "zero2", f"model.name_or_path={tiny_model_dir}", "train.output_dir=run",
          "train.max_steps=2", "train.micro_batch_size=4", "train.eval_every=2",
          "train.save_every=2", "logging.mode=disabled"], user)
    summary = json.loads((user / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["method"] == "lora_moe", summary
    assert summary["world_size"] == 2, summary
    assert (user / "run" / "checkpoints" / "step-000002" / "adapter").is_dir()
    metrics = [json.loads(line) for line in (user / "run" / "metrics.jsonl").open()]
    assert any("eval/loss" in r for r in metrics)

    # evaluate on a multiple-choice file
    mcq = [json.loads(line) for line in toy_data[1].open() if '"options"' in line]
    (user / "mcq.jsonl").write_text("".join(json.dumps(r) + "\n" for r in mcq))
    _run([venv / "sparsedoc", "evaluate", "--model", "run", "--tasks", "mcq.jsonl",
          "--limit", "4"], user)
    result = json.loads((user / "run" / "eval" / "mcq.json").read_text())
    assert len(result["items"]) == 4, result.keys()

    # export, then load the export with the installed package
    _run([venv / "sparsedoc", "export", "run", "exported"], user)
    meta = json.loads((user / "exported" / "export_metadata.json").read_text())
    assert meta["mode"] == "routed", meta
    loaded = _run([venv / "python", "-c", "import sparsedoc; "
                   "m = sparsedoc.load_pretrained('exported'); print(type(m).__name__)"], user)
    assert loaded.strip() == "SparsedocMoEForCausalLM", loaded
