"""The summarization protocol's sweep on a tiny T5: 2 seeds x 2 LoRA ranks, each run trained,
evaluated with ROUGE on held-out SumPubMed records, and the comparison table over the 4 runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from t5_fixtures import PREFIX

pytestmark = pytest.mark.slow


def test_a_two_seed_two_rank_t5_sweep_reports_four_runs(tiny_t5_dir, t5_data, tmp_path,  # noqa: F811
                                                        capsys, monkeypatch):
    from sparsedoc.sweep import main

    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    train, evals = t5_data
    out = tmp_path / "sweep"
    args = ["lora", "--out", str(out), "--seeds", "0,1", "--param", "rank", "--values", "2,4",
            "--eval-tasks", str(evals), "--eval-arg", "limit=2", "--eval-arg", "max_new_tokens=8",
            f"model.name_or_path={tiny_t5_dir}", "model.dtype=fp32",
            f"data.train_files=[{train}]", f"data.eval_files=[{evals}]",
            f"data.source_prefix={PREFIX!r}", "data.max_source_len=96", "data.max_target_len=64",
            "data.max_seq_len=96", "adapter.lora.target_modules=[q,k,v,o,wi,wo]",
            "train.max_steps=2", "train.micro_batch_size=4", "train.eval_every=2",
            "train.save_every=2", "logging.wandb=false"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["done"] * 4
    assert manifest["param"] == "adapter.lora.r"
    for r in manifest["runs"]:  # each run trained with its rank and seed, and was scored
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        cfg = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        assert summary["steps"] == 2, summary
        assert (cfg["train"]["seed"], cfg["adapter"]["lora"]["r"]) == (r["seed"], int(r["value"]))
        assert (Path(r["run_dir"]) / "eval").is_dir(), r
    rows = [line for line in printed.splitlines() if re.match(r"\| lora r=\d ", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["lora r=2", "lora r=4"], printed
    for row in rows:
        assert row.split("|")[2].strip() == "2" and row.split("|")[3].strip() == "0,1", row
    assert "rouge" in printed.lower(), printed
