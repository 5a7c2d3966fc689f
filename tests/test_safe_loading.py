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


def _run_asking_for_remote_code(tmp_path, tiny_model_dir) -> Path:
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 1}))
    (ckpt / "config.yaml").write_text(yaml.safe_dump(
        {"model": {"name_or_path": str(tiny_model_dir), "trust_remote_code": True},
         "adapter": {"method": "lora"}}))
    return ckpt


def test_a_run_config_cannot_turn_on_trust_remote_code(tmp_path, tiny_model_dir):
    from sparsedoc.loader import load_trained

    ckpt = _run_asking_for_remote_code(tmp_path, tiny_model_dir)
    with pytest.raises(UserError, match="trust_remote_code=true.*pass --trust-remote-code"):
        load_trained(str(ckpt))
    # with the user's opt-in it gets past that gate: the next check speaks (no adapter here)
    with pytest.raises(UserError, match="adapter: missing"):
        load_trained(str(ckpt), trust_remote_code=True)


def _model_folder_with_its_own_code(tmp_path, tiny_model_dir) -> tuple[Path, Path]:
    """A copy of the tiny model whose config points the Auto classes at its own ``evil.py``,
    which creates the returned marker file when imported. It defines subclasses: transformers
    registers a remote class for the Auto classes, and registering LlamaForCausalLM itself
    would make every later ``save_pretrained`` in the session look for remote code."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "REMOTE_CODE_RAN"
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n"
                                    "from transformers import LlamaConfig, LlamaForCausalLM\n"
                                    "class EvilConfig(LlamaConfig):\n    pass\n"
                                    "class EvilModel(LlamaForCausalLM):\n"
                                    "    config_class = EvilConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig",
                          "AutoModelForCausalLM": "evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    return folder, marker


def test_a_model_folder_s_own_code_never_runs_by_default(tmp_path, tiny_model_dir):
    """A model folder whose config points the Auto classes at its own Python (auto_map) is
    loaded with the built-in class, or refused; its code is never imported."""
    from sparsedoc.config import ModelCfg
    from sparsedoc.models.load import load_model_and_tokenizer

    folder, marker = _model_folder_with_its_own_code(tmp_path, tiny_model_dir)
    assert ModelCfg().trust_remote_code is False
    try:
        model, _, _ = load_model_and_tokenizer(ModelCfg(name_or_path=str(folder)))
        assert type(model).__module__.startswith("transformers.")
    except UserError as e:
        assert "trust_remote_code" in str(e)
    assert not marker.exists()


def test_the_user_s_own_opt_in_does_run_a_model_folder_s_code(tmp_path, tiny_model_dir):
    """Positive control for the test above: the same folder, loaded with the user's
    ``--trust-remote-code``, does import its own Python; so the default really is what keeps
    it out."""
    from transformers import LlamaForCausalLM

    from sparsedoc.loader import load_trained

    folder, marker = _model_folder_with_its_own_code(tmp_path, tiny_model_dir)
    model, _, loaded = load_trained(str(folder), device="cpu", trust_remote_code=True)
    assert marker.exists() and loaded.kind == "hf" and type(model).__name__ == "EvilModel"
    assert getattr(LlamaForCausalLM, "_auto_class", None) is None  # nothing leaks to later tests

BF16_CHECKPOINTS = '''
import os, sys, torch, deepspeed
for k, v in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2], RANK="0", WORLD_SIZE="1",
                 LOCAL_RANK="0").items():
    os.environ.setdefault(k, v)
torch.manual_seed(0)
for stage in (2,):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    config = {"train_micro_batch_size_per_gpu": 2, "bf16": {"enabled": True},
              "zero_optimization": {"stage": stage},
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
              "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 1}}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=config)
    loss = engine(torch.randn(2, 8).to(engine.device).bfloat16()).float().pow(2).mean()
    engine.backward(loss)
    engine.step()
    engine.save_checkpoint(os.path.join(sys.argv[1], f"zero{stage}"))
'''


def test_real_bf16_zero_checkpoints_pass_the_allow_list(tmp_path):
    """The bf16 ZeRO-2 optimizer state DeepSpeed really writes (the GPU recipe's default:
    ds_configs/zero2.json in bf16; DeepSpeed's CPU accelerator writes the same objects) names no
    global beyond the allow-list, so the weights-only resume path accepts it. (bf16 ZeRO-3 was
    checked by hand the same way and holds the classes of the fp32 ZeRO-3 launcher tests.)"""
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "bf16_checkpoints.py"
    script.write_text(BF16_CHECKPOINTS)
    run = subprocess.run([sys.executable, str(script), str(tmp_path / "ck"), str(port)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    for stage in (2,):
        files = sorted((tmp_path / "ck" / f"zero{stage}").rglob("*.pt"))
        assert any("optim_states" in f.name for f in files), files
        for f in files:
            assert unsafe_globals(f) == [], f
        check_torch_files(files[0].parent)
        with weights_only_loads():
            optim = torch.load(next(f for f in files if "optim_states" in f.name),
                               weights_only=False)
        assert "optimizer_state_dict" in optim
