"""The method registry: every command finds a method by name, a new method is one module plus
one registry line, and what differs between methods is stated by the methods themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsedoc import methods
from sparsedoc.config import MoECfg
from sparsedoc.methods import UnknownMethod, method_class, method_name, new_method
from sparsedoc.methods.base import MethodError

REPO = Path(__file__).resolve().parents[1]


def test_every_registered_method_is_the_class_of_that_name():
    assert list(methods.METHODS) == ["lora_moe", "lora", "full", "prompt", "sensitivity_lora"]
    for name in methods.METHODS:
        cls = method_class(name)
        assert cls.name == name and type(new_method(name)) is cls
        assert cls.title and cls.summary and cls.tag
    assert method_name("moe") == "lora_moe"
    with pytest.raises(UnknownMethod, match="unknown method 'lora_mo'; expected one of "
                                            "lora_moe, lora, full, prompt, "
                                            "sensitivity_lora"):
        method_class("lora_mo")


def test_export_modes_are_the_methods_own():
    lora, full, prompt, moe = (method_class(n) for n in ("lora", "full", "prompt", "lora_moe"))
    assert lora.export_mode("auto") == full.export_mode("auto") == "merged"
    with pytest.raises(MethodError, match="--mode routed does not apply to a lora model"):
        lora.export_mode("routed")
    with pytest.raises(MethodError, match="soft prompt that no merged checkpoint can hold"):
        prompt.export_mode("auto")
    assert moe.export_mode("auto", MoECfg(mode="linear")) == "routed"
    assert moe.export_mode("auto", MoECfg(mode="ffn")) == "mixtral"
    assert moe.export_mode("dense", MoECfg(mode="ffn")) == "dense"
    with pytest.raises(MethodError, match="mode mixtral needs an FFN-expert LoRA-MoE"):
        moe.export_mode("mixtral", MoECfg(mode="linear"))
    with pytest.raises(MethodError, match="mode merged needs a LoRA or full fine-tune run"):
        moe.merged(None)


def test_sweep_short_names_come_from_the_methods():
    from sparsedoc.sweep import param_aliases, resolve_param

    assert param_aliases()["rank"] == {"lora_moe": "adapter.moe.r", "lora": "adapter.lora.r",
                                       "sensitivity_lora": "adapter.lora.r"}
    assert resolve_param("moe", "experts") == "adapter.moe.num_experts"
    with pytest.raises(ValueError, match="--param experts does not apply to method lora"):
        resolve_param("lora", "experts")


THROWAWAY = '''
"""A throwaway method: only the final norm trains."""
from sparsedoc.methods.base import Method


class NormOnly(Method):
    name = "norm_only"
    title = summary = tag = "final norm only"
    default_config = "lora_demo"

    def build(self, model, cfg):
        for n, p in model.named_parameters():
            p.requires_grad_(n == "model.norm.weight")
        return model
'''

DRIVER = '''
import sys
from sparsedoc import methods
methods.METHODS["norm_only"] = "norm_only:NormOnly"  # the one registry line
from sparsedoc.train.recipe import run_recipe
run_recipe("norm_only", sys.argv[1:])
'''


@pytest.mark.slow
def test_a_new_method_is_one_module_and_one_registry_line(tiny_model_dir, toy_data, tmp_path):
    (tmp_path / "norm_only.py").write_text(THROWAWAY)
    (tmp_path / "driver.py").write_text(DRIVER)
    train, _ = toy_data
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(tmp_path))
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "driver.py"), f"model.name_or_path={tiny_model_dir}",
         f"data.train_files=[{train}]", "data.eval_files=[]", f"train.output_dir={out}",
         "train.max_steps=1", "train.micro_batch_size=2", "logging.wandb=false"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["method"] == "norm_only" and summary["steps"] == 1
    assert "trainable params: 64 of" in proc.stderr + proc.stdout  # hidden size of the tiny model
