"""``artifacts.locate``: every folder sparsedoc writes is recognised, from any level, and
anything else is refused with a message that says what was expected."""

from __future__ import annotations

import json

import pytest

from sparsedoc.artifacts import ArtifactError, locate, read_adapter_meta
from sparsedoc.config import Config, save_config


def _run(tmp_path):
    run = tmp_path / "run"
    save_config(Config(), run / "config.yaml")
    for step in (1, 2):
        ckpt = run / "checkpoints" / f"step-{step:06d}"
        (ckpt / "adapter").mkdir(parents=True)
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": step, "epoch": 0}))
        (ckpt / "adapter" / "adapter_config.json").write_text(json.dumps(
            {"format": "sparsedoc-lora-moe", "base_model": "embedded",
             "moe": {"num_experts": 4, "top_k": 2}, "modules": ["a"]}))
    (run / "checkpoints" / "tmp-step-000003").mkdir()  # an interrupted save: never picked
    (run / "checkpoints" / "step-000004").mkdir()  # no trainer_state yet: incomplete
    return run


def test_a_run_its_checkpoint_and_its_adapter_all_know_the_run(tmp_path):
    run = _run(tmp_path)
    latest = run / "checkpoints" / "step-000002"
    art = locate(run)
    assert (art.kind, art.run_dir, art.checkpoint, art.step) == ("run", run, latest, 2)
    assert art.name == "run@2" and art.config_file == run / "config.yaml"
    assert art.adapter.method == "lora_moe" and art.adapter.moe == {"num_experts": 4, "top_k": 2}
    first = locate(run / "checkpoints" / "step-000001")
    assert (first.kind, first.run_dir, first.step) == ("checkpoint", run, 1)
    adapter = locate(latest / "adapter")
    assert (adapter.kind, adapter.run_dir, adapter.checkpoint, adapter.step) == \
        ("adapter", run, latest, 2)
    assert adapter.config().adapter.method == Config().adapter.method


def test_peft_adapters_models_and_hub_ids(tmp_path):
    peft_dir = tmp_path / "peft"
    peft_dir.mkdir()
    (peft_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "PROMPT_TUNING", "base_model_name_or_path": "some/base"}))
    meta = read_adapter_meta(peft_dir)
    assert (meta.method, meta.base_model, meta.moe) == ("prompt", "some/base", None)
    art = locate(peft_dir)
    assert (art.kind, art.run_dir, art.checkpoint) == ("adapter", None, None)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    assert locate(model).kind == "hf" and locate(model).config() is None
    assert locate("org/name").kind == "hf" and locate("org/name").path == "org/name"


def test_what_is_not_an_artifact_is_refused_by_name(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArtifactError, match=r"empty: not a run folder .*config.json"):
        locate(empty)
    (tmp_path / "f.txt").write_text("x")
    with pytest.raises(ArtifactError, match="f.txt: a file"):
        locate(tmp_path / "f.txt")
    run = tmp_path / "r"
    save_config(Config(), run / "config.yaml")
    (run / "checkpoints").mkdir()
    with pytest.raises(ArtifactError, match="no complete checkpoint"):
        locate(run)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text("[1, 2")
    with pytest.raises(ArtifactError, match=r"bad/adapter_config.json: not valid JSON"):
        read_adapter_meta(bad)


def test_a_missing_local_path_is_refused_but_hub_ids_and_embedded_pass(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for missing in [str(tmp_path / "nope"), "./nope", "~/nope-sparsedoc", "a/b/nope", "runs/nope"]:
        with pytest.raises(ArtifactError, match=r"nope.*: no such folder \(expected a training run"):
            locate(missing)
    assert locate("org/name").kind == "hf"  # no folder "org" here: a hub id
    assert locate("embedded").path == "embedded"
