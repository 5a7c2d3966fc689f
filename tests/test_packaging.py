"""Bundled files resolve from any folder, and the front doors (``sparsedoc --version``, ``env``,
``train``, ``python -m data_prep.NAME``) work without a checkout on the path.

The wheel itself is built, installed and run in tests/test_wheel.py (slow).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsedoc.resources import ds_config_path, recipe_config_path, resolve_path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "sparsedoc"


def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sparsedoc.cli", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_bundled_paths_resolve_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = PACKAGE / "prep" / "demo" / "train.jsonl"
    assert resolve_path("sparsedoc/prep/demo/train.jsonl").resolve() == demo
    # what run folders of earlier checkouts recorded in their config.yaml
    assert resolve_path("data_prep/demo/train.jsonl").resolve() == demo
    assert resolve_path("ds_configs/zero3.json").resolve() == PACKAGE / "ds_configs" / "zero3.json"
    # a file of the user's own with a bundled name wins over the bundled one
    (tmp_path / "sparsedoc" / "prep" / "demo").mkdir(parents=True)
    mine = tmp_path / "sparsedoc" / "prep" / "demo" / "train.jsonl"
    mine.write_text("{}\n")
    assert resolve_path("sparsedoc/prep/demo/train.jsonl").resolve() == mine
    assert resolve_path("nothing/here.jsonl") == Path("nothing/here.jsonl")


def test_ds_and_recipe_configs_by_name_or_path(tmp_path):
    assert ds_config_path("zero2") == PACKAGE / "ds_configs" / "zero2.json"
    assert json.loads(ds_config_path("zero3_offload").read_text())["zero_optimization"]["stage"] == 3
    own = tmp_path / "mine.json"
    own.write_text("{}")
    assert ds_config_path(str(own)) == own
    with pytest.raises(FileNotFoundError, match=r"zero4 .*bundled names: zero2, zero3, zero3_off"):
        ds_config_path("zero4")
    assert recipe_config_path("llama3_8b_moe").name == "llama3_8b_moe.yaml"
    with pytest.raises(FileNotFoundError, match="recipe config not found: nope.yaml"):
        recipe_config_path("nope.yaml")


def test_checkout_links_point_at_the_packaged_files():
    assert (REPO / "ds_configs").resolve() == PACKAGE / "ds_configs"
    assert (REPO / "recipes" / "configs").resolve() == PACKAGE / "recipes" / "configs"
    assert (REPO / "recipes" / "configs" / "moe_demo.yaml").is_file()


def test_version_and_env(tmp_path):
    import importlib.metadata

    out = _cli(["--version"], tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == \
        f"sparsedoc {importlib.metadata.version('sparsedoc')}", out
    env = _cli(["env", "--json"], tmp_path)
    assert env.returncode == 0, env.stderr
    report = json.loads(env.stdout)
    assert report["packages"]["torch"] == torch.__version__
    assert report["accelerator"]["cuda_available"] == torch.cuda.is_available()
    assert report["embedded_model"]["state"] in ("complete", "missing", "incomplete")
    assert isinstance(report["deepspeed_ops"], dict) and report["deepspeed_ops"]
    text = _cli(["env"], tmp_path)
    assert "flash-attn" in text.stdout and "embedded model" in text.stdout


def test_train_rejects_an_unknown_method_listing_the_known_ones(tmp_path):
    out = _cli(["train", "lora_mo"], tmp_path)
    assert out.returncode == 2
    assert "unknown method 'lora_mo'; expected one of lora_moe, lora, full, prompt" in out.stderr


def test_recipe_modules_and_converter_entry_points_run(tmp_path):
    for module in ("sparsedoc.recipes.train_moe", "sparsedoc.recipes.evaluate",
                   "sparsedoc.prep.cmexam"):
        out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0 and "usage:" in out.stdout, (module, out.stderr[-2000:])
    # the checkout's thin entry points
    out = subprocess.run([sys.executable, "-m", "data_prep.cmexam", "--help"], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "--src" in out.stdout, out.stderr[-2000:]
