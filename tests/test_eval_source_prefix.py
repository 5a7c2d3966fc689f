"""An encoder-decoder run is evaluated with the instruction it was trained with."""

from __future__ import annotations

from types import SimpleNamespace

from sparsedoc.artifacts import RUN_CONFIG, Loaded
from sparsedoc.config import Config, DataCfg, EvalCfg, save_config
from sparsedoc.eval.runner import _with_training_source_prefix


def _run_folder(tmp_path, prefix: str):
    ckpt = tmp_path / "run" / "checkpoints" / "step-000004"
    ckpt.mkdir(parents=True)
    save_config(Config(data=DataCfg(source_prefix=prefix)), ckpt / RUN_CONFIG)
    return Loaded(kind="checkpoint", method="lora", path=str(ckpt), base_model="t5",
                  fingerprint="x", name="run@4", device="cpu", dtype="fp32",
                  checkpoint=str(ckpt), step=4)


def _model(encoder_decoder: bool):
    return SimpleNamespace(config=SimpleNamespace(is_encoder_decoder=encoder_decoder))


def test_a_t5_run_is_asked_with_its_training_prefix_unless_one_is_given(tmp_path):
    loaded = _run_folder(tmp_path, "summarize: ")
    cfg = EvalCfg(model=loaded.path, tasks=["x.jsonl"])
    assert _with_training_source_prefix(cfg, _model(True), loaded).source_prefix == "summarize: "
    given = EvalCfg(model=loaded.path, tasks=["x.jsonl"], source_prefix="tl;dr: ")
    assert _with_training_source_prefix(given, _model(True), loaded).source_prefix == "tl;dr: "
    # a decoder's prompt is its chat template: the data.source_prefix of a run does not apply
    assert _with_training_source_prefix(cfg, _model(False), loaded).source_prefix == ""
