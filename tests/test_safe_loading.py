"""sparsedoc.safeload: nothing from a checkpoint, adapter or export folder is unpickled. A folder
holding a malicious pickle is refused with a message, and the payload (which would create a
marker file) never runs: not through the static check, not through DeepSpeed's own loads."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
import yaml

from sparsedoc.errors import UserError
from sparsedoc.safeload import (UnsafeFileError, check_torch_files, unsafe_globals,
                                weights_only_loads)


class Payload:
    """Unpickling this calls ``open(marker, "w")``: the marker file is the proof it ran."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _checkpoint(root: Path, method: str, model_dir: Path, *, pickle_kind: str) -> Path:
    """A sparsedoc checkpoint folder whose DeepSpeed model states carry the payload."""
    ckpt = root / "run" / "checkpoints" / "step-000002"
    ckpt.mkdir(parents=True)
    marker = root / "PAYLOAD_RAN"
    states = ckpt / "mp_rank_00_model_states.pt"
    if pickle_kind == "torch.save":  # a real torch zip whose pickle names io.open
        torch.save({"module": {"w": torch.zeros(2)}, "extra": Payload(marker)}, states)
    else:  # a bare pickle renamed to .pt
        states.write_bytes(pickle.dumps({"extra": Payload(marker)}))
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2, "world_size": 1}))
    (ckpt / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"name_or_path": str(model_dir)}, "adapter": {"method": method}}))
    assert not marker.exists()
    return ckpt


@pytest.mark.parametrize("pickle_kind", ["torch.save", "raw pickle"])
def test_a_malicious_checkpoint_is_refused_before_deepspeed_sees_it(tmp_path, pickle_kind,
                                                                    tiny_model_dir):
    from sparsedoc.checkpoint import load_checkpoint

    ckpt = _checkpoint(tmp_path, "full", tiny_model_dir, pickle_kind=pickle_kind)
    with pytest.raises(UnsafeFileError) as e:
        load_checkpoint(None, ckpt, rank=0, exclude_frozen=False)  # resume refuses first
    assert "mp_rank_00_model_states.pt: refused" in str(e.value)
    if pickle_kind == "torch.save":
        assert "io.open" in str(e.value) or "builtins.open" in str(e.value)
    assert not (tmp_path / "PAYLOAD_RAN").exists()


def test_export_of_a_malicious_full_checkpoint_exits_with_the_message(tmp_path, tiny_model_dir,
                                                                      capsys):
    from sparsedoc.cli import main

    ckpt = _checkpoint(tmp_path, "full", tiny_model_dir, pickle_kind="torch.save")
    assert main(["export", str(ckpt), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "export FAILED" in err and "refused" in err and "Traceback" not in err
    assert not (tmp_path / "PAYLOAD_RAN").exists() and not (tmp_path / "out").exists()


def test_forced_weights_only_stops_a_load_that_skipped_the_check(tmp_path):
    """The second line: DeepSpeed calls torch.load(weights_only=False); inside
    weights_only_loads that is weights-only anyway."""
    marker = tmp_path / "PAYLOAD_RAN"
    f = tmp_path / "x.pt"
    torch.save({"extra": Payload(marker)}, f)
    with pytest.raises(UnsafeFileError, match="not weights only"):
        with weights_only_loads():
            torch.load(f, weights_only=False)
    assert not marker.exists()
    import os
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored afterwards


def test_deepspeed_optimizer_state_is_allowed(tmp_path):
    """What DeepSpeed's ZeRO optimizer state really holds passes the check and the load."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    f = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    torch.save({"optimizer_state_dict": {"loss_scaler": LossScaler(1.0),
                                         "zero_stage": ZeroStageEnum.gradients,
                                         "fp32": [torch.ones(3)]}}, f)
    assert unsafe_globals(f) == []
    check_torch_files(tmp_path)
    with weights_only_loads():
        state = torch.load(f, weights_only=False)
    assert state["optimizer_state_dict"]["loss_scaler"].cur_scale == 1.0


def test_a_malicious_adapter_bin_is_refused(tmp_path, tiny_model_dir):
    from sparsedoc.loader import load_trained

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "base_model_name_or_path": str(tiny_model_dir)}))
    torch.save({"w": Payload(tmp_path / "PAYLOAD_RAN")}, adapter / "adapter_model.bin")
    with pytest.raises(UserError, match="adapter_model.bin: refused"):
        load_trained(str(adapter))
    assert not (tmp_path / "PAYLOAD_RAN").exists()


def test_a_run_config_cannot_turn_on_trust_remote_code(tmp_path, tiny_model_dir):
    from sparsedoc.loader import load_trained

    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1}))
    (ckpt / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"name_or_path": str(tiny_model_dir), "trust_remote_code": True},
         "adapter": {"method": "lora"}}))
    with pytest.raises(UserError, match="trust_remote_code=true"):
        load_trained(str(ckpt))


def test_a_model_folder_s_own_code_never_runs_by_default(tmp_path, tiny_model_dir):
    """A model folder whose config points the Auto classes at its own Python (auto_map) is
    loaded with the built-in class, or refused; its code is never imported."""
    import shutil

    from sparsedoc.config import ModelCfg
    from sparsedoc.models.load import load_model_and_tokenizer

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "from transformers import LlamaConfig as EvilConfig\n"
                                    "from transformers import LlamaForCausalLM as EvilModel\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig",
                          "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    assert ModelCfg().trust_remote_code is False
    try:
        model, _, _ = load_model_and_tokenizer(ModelCfg(name_or_path=str(folder)))
        assert type(model).__module__.startswith("transformers.")
    except UserError as e:
        assert "trust_remote_code" in str(e)
    assert not marker.exists()
