"""sparsedoc.config and the DeepSpeed JSON filler: round-trips, rejected keys and values, and every
YAML and JSON config the project ships."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from sparsedoc.config import Config, ConfigError, load_config, save_config
from sparsedoc.distributed import build_ds_config

REPO = Path(__file__).resolve().parents[1]
RECIPE_YAMLS = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
DS_JSONS = sorted((REPO / "ds_configs").glob("*.json"))


def _leaves(tree: dict, prefix: str = ""):
    """(dotted key, value) for every leaf of a nested YAML mapping."""
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            yield from _leaves(v, key)
        else:
            yield key, v


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _find_auto(node, path=""):
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _find_auto(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in _find_auto(v, f"{path}[{i}]")]
    return [path] if node == "auto" else []


# ---- YAML + overrides ------------------------------------------------------------------------


def test_yaml_and_overrides_round_trip(tmp_path):
    cfg = load_config(REPO / "recipes" / "configs" / "lora_demo.yaml",
                      ["train.lr=3e-4", "adapter.lora.target_modules=[q_proj,v_proj]",
                       "data.packing=true"])
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float)
    assert cfg.adapter.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.data.packing is True
    # untouched YAML values survive next to the overrides
    assert cfg.train.max_steps == 60 and cfg.adapter.method == "lora"
    assert cfg.data.max_seq_len == 256

    saved = tmp_path / "sub" / "config.yaml"
    save_config(cfg, saved)
    assert not saved.with_name("config.yaml.tmp").exists()  # written atomically
    assert yaml.safe_load(saved.read_text())["train"]["lr"] == 3e-4
    again = load_config(saved)
    assert again == cfg
    assert dataclasses.asdict(again) == dataclasses.asdict(cfg)


def test_override_of_a_default_config_without_yaml():
    cfg = load_config(None, ["train.max_steps=7", "adapter.moe.num_experts=8",
                             "adapter.moe.top_k=3", "logging.tags=[a,b]"])
    assert (cfg.train.max_steps, cfg.adapter.moe.num_experts, cfg.adapter.moe.top_k) == (7, 8, 3)
    assert cfg.logging.tags == ["a", "b"]
    assert cfg.train.lr == Config().train.lr


# ---- rejected keys and values ----------------------------------------------------------------


def test_unknown_override_key_names_the_key_and_lists_valid_ones():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.lrr=1"])
    msg = str(e.value)
    assert "train.lrr" in msg
    assert "'lr'" in msg and "'max_steps'" in msg  # the valid keys of train are listed


def test_unknown_top_level_override_section():
    with pytest.raises(ConfigError, match=r"unknown config key 'trian.lr'") as e:
        load_config(None, ["trian.lr=1"])
    assert "'train'" in str(e.value)


def test_unknown_yaml_key_names_dotted_key_and_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  max_steps: 3\n  lrr: 0.1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert "train.lrr" in msg and "'lr'" in msg and str(path) in msg


@pytest.mark.parametrize("override,needles", [
    ("train.max_steps=abc", ["train.max_steps", "integer", "'abc'"]),
    ("adapter.moe.top_k=9", ["adapter.moe.top_k", "(4)", "got 9"]),
    ("data.max_seq_len=4", ["data.max_seq_len", ">= 16", "got 4"]),
    ("data.packing=maybe", ["data.packing", "true or false"]),
    ("train.lr=-1", ["train.lr", "> 0"]),
    ("adapter.lora.target_modules=3", ["adapter.lora.target_modules", "expected a list"]),
])
def test_bad_values_are_rejected_with_the_key_named(override, needles):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


def test_override_setting_into_a_value_is_rejected():
    with pytest.raises(ConfigError, match=r"'train.lr' is a value, not a section"):
        load_config(None, ["train.lr.x=1"])


def test_override_without_equals_sign_is_rejected():
    with pytest.raises(ConfigError, match=r"override 'train.lr': expected key.sub=value"):
        load_config(None, ["train.lr"])


def test_missing_yaml_file(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match="config file not found") as e:
        load_config(missing)
    assert str(missing) in str(e.value)


def test_yaml_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        load_config(path)


# ---- every shipped config --------------------------------------------------------------------


def test_recipe_config_glob_is_not_vacuous():
    names = {p.name for p in RECIPE_YAMLS}
    assert len(RECIPE_YAMLS) >= 4, names
    assert {"lora_demo.yaml", "full_demo.yaml", "moe_demo.yaml"} <= names


@pytest.mark.parametrize("path", RECIPE_YAMLS, ids=lambda p: p.name)
def test_every_recipe_yaml_loads_with_every_value_applied(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    tree = yaml.safe_load(path.read_text())
    leaves = list(_leaves(tree))
    assert leaves, f"{path} is empty"
    for key, value in leaves:  # nothing in the file is silently ignored or altered
        assert _get(cfg, key) == value, (key, _get(cfg, key), value)


def test_ds_config_glob_is_not_vacuous():
    names = {p.name for p in DS_JSONS}
    assert {"zero2.json", "zero3.json", "zero3_offload.json"} <= names


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_every_ds_json_is_fully_resolved_from_the_config(path):
    cfg = Config()
    ds = build_ds_config(path, cfg, world_size=2, dtype=torch.float32)
    assert _find_auto(ds) == []
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size == 4
    assert ds["gradient_accumulation_steps"] == cfg.train.grad_accum == 1
    assert ds["train_batch_size"] == 4 * 1 * 2
    assert ds["gradient_clipping"] == cfg.train.max_grad_norm
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["optimizer"]["params"]["lr"] == cfg.train.lr
    assert ds["optimizer"]["params"]["weight_decay"] == cfg.train.weight_decay
    assert ds["scheduler"]["type"] == "WarmupCosineLR"
    assert ds["scheduler"]["params"]["total_num_steps"] == cfg.train.max_steps
    assert ds["scheduler"]["params"]["warmup_num_steps"] == cfg.train.warmup_steps
    # the template on disk is not modified by filling
    assert json.loads(path.read_text())["train_batch_size"] == "auto"


@pytest.mark.parametrize("path", DS_JSONS, ids=lambda p: p.name)
def test_every_ds_json_is_accepted_by_deepspeed(path):
    from deepspeed.runtime.config import DeepSpeedConfig

    cfg = load_config(None, ["train.micro_batch_size=3", "train.grad_accum=5"])
    # DeepSpeedConfig checks batch sizes against the (uninitialised: 1) process-group size
    ds = build_ds_config(path, cfg, world_size=1, dtype=torch.float32)
    parsed = DeepSpeedConfig(ds)
    assert parsed.train_batch_size == 15
    assert parsed.train_micro_batch_size_per_gpu == 3
    assert parsed.gradient_accumulation_steps == 5
    assert parsed.zero_optimization_stage == json.loads(path.read_text())[
        "zero_optimization"]["stage"]


def test_ds_batch_sizes_follow_micro_accum_world():
    cfg = load_config(None, ["train.micro_batch_size=3", "train.grad_accum=5"])
    ds = build_ds_config(REPO / "ds_configs" / "zero2.json", cfg, world_size=4,
                         dtype=torch.bfloat16)
    assert ds["train_batch_size"] == 3 * 5 * 4
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False


def test_ds_explicit_value_disagreeing_with_config_names_the_key(tmp_path):
    template = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    template["train_micro_batch_size_per_gpu"] = 16
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(template))
    with pytest.raises(ConfigError) as e:
        build_ds_config(path, Config(), world_size=2, dtype=torch.float32)
    msg = str(e.value)
    assert "train_micro_batch_size_per_gpu" in msg and "16" in msg and "4" in msg
    assert str(path) in msg


def test_ds_explicit_value_agreeing_with_config_is_kept():
    template = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    template["train_micro_batch_size_per_gpu"] = 4
    ds = build_ds_config(template, Config(), world_size=1, dtype=torch.float32)
    assert ds["train_micro_batch_size_per_gpu"] == 4


def test_ds_unknown_leftover_auto_names_its_path():
    template = json.loads((REPO / "ds_configs" / "zero2.json").read_text())
    template["zero_optimization"]["sub_group_size"] = "auto"
    with pytest.raises(ConfigError) as e:
        build_ds_config(template, Config(), world_size=1, dtype=torch.float32)
    assert "zero_optimization.sub_group_size" in str(e.value)
    assert "unresolved" in str(e.value)


def test_ds_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="DeepSpeed config not found"):
        build_ds_config(tmp_path / "nope.json", Config(), world_size=1, dtype=torch.float32)


def test_expert_contrast_settings_that_cannot_work_are_rejected():
    from sparsedoc.config import MoECfg

    with pytest.raises(ConfigError, match="contrastive_tokens: contrastive=expert needs >= 2"):
        MoECfg(contrastive="expert", contrastive_tokens=1)
    MoECfg(contrastive="expert", num_experts=2, top_k=2)  # every expert chosen: still contrasted
    MoECfg(contrastive="label", contrastive_tokens=0)  # the label contrast samples no token


# ---- dry-run: the 8B MediGen configs resolve without a GPU -----------------------------------


@pytest.mark.parametrize("name,method", [("llama3_8b_medigen_lora", "lora"),
                                         ("llama3_8b_medigen_moe", "lora_moe")])
def test_medigen_8b_configs_resolve_in_a_dry_run(name, method, capsys):
    from sparsedoc.cli import main

    assert main(["train", method, "--gpus", "8", "--config", name, "--ds", "zero2",
                 "--dry-run"]) == 0
    out = capsys.readouterr().out
    head, _, ds_text = out.partition("# DeepSpeed JSON from ")
    cfg_text = head.split("\n", 1)[1]
    resolved = yaml.safe_load(cfg_text)
    ds = json.loads(ds_text.split("\n", 1)[1])
    # the printed config is the YAML file, resolved: every value in the file is there
    tree = yaml.safe_load((REPO / "recipes" / "configs" / f"{name}.yaml").read_text())
    for key, value in _leaves(tree):
        node = resolved
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    assert resolved["adapter"]["method"] == method
    assert resolved["model"]["dtype"] == "bf16" and resolved["data"]["max_seq_len"] == 4096
    assert [Path(f).parts[-2] for f in resolved["data"]["train_files"]] == ["aci_bench",
                                                                           "mts_dialog"]
    # the DeepSpeed JSON: bf16, ZeRO-2, batch sizes for 8 ranks, nothing left "auto"
    t = resolved["train"]
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == t["micro_batch_size"]
    assert ds["gradient_accumulation_steps"] == t["grad_accum"]
    assert ds["train_batch_size"] == t["micro_batch_size"] * t["grad_accum"] * 8
    assert ds["optimizer"]["params"]["lr"] == t["lr"]
    assert ds["scheduler"]["params"]["total_num_steps"] == t["max_steps"]
    assert "auto" not in json.dumps(ds)
