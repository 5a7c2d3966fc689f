"""The comparison report on fake runs with known metrics, and the sweep helper's grid."""

from __future__ import annotations

import csv
import json
import math
import shlex
import sys
from pathlib import Path

import pytest

from sparsedoc.config import Config, save_config
from sparsedoc.eval.report import build_report


def fake_run(root: Path, name: str, method: str, seed: int, metrics: dict[str, dict],
             trainable_pct: float, seconds: float, rank: int = 8) -> Path:
    run = root / name
    cfg = Config()
    cfg.adapter.method = method
    cfg.adapter.lora.r = rank
    cfg.train.seed = seed
    save_config(cfg, run / "config.yaml")
    (run / "summary.json").write_text(json.dumps({"trainable_pct": trainable_pct,
                                                  "train_seconds": seconds}))
    for task, m in metrics.items():
        (run / "eval").mkdir(parents=True, exist_ok=True)
        (run / "eval" / f"{task}.json").write_text(json.dumps({"task": task, "metrics": m}))
    return run


@pytest.fixture
def three_lora_one_full(tmp_path):
    rouge = [43.5, 43.3, 43.7]  # mean 43.5, std 0.2
    acc = [40.0, 41.0, 45.0]  # mean 42, std sqrt(7) = 2.6458
    runs = [fake_run(tmp_path, f"lora-s{s}", "lora", s,
                     {"mts_dialog": {"rouge1": rouge[s]},
                      "cmexam": {"acc_loglik": acc[s], "unparsed_generate": 3}},
                     0.45, 600 + 60 * s) for s in range(3)]
    runs.append(fake_run(tmp_path, "full-s0", "full", 0,
                         {"mts_dialog": {"rouge1": 40.67}, "cmexam": {"acc_loglik": 38.0}},
                         100.0, 1800))
    return runs


def test_report_mean_and_std_are_exact(three_lora_one_full, tmp_path):
    res = build_report(three_lora_one_full, tmp_path / "report")
    assert res["metrics"] == ["cmexam/acc_loglik", "mts_dialog/rouge1"]  # unparsed_* left out
    lora, full = res["rows"]
    assert lora.group == "lora" and lora.seeds == "0,1,2" and len(lora.runs) == 3
    assert lora.metrics["cmexam/acc_loglik"][:2] == (42.0, pytest.approx(math.sqrt(7)))
    assert lora.metrics["mts_dialog/rouge1"][0] == pytest.approx(43.5)
    assert lora.metrics["mts_dialog/rouge1"][1] == pytest.approx(0.2)
    assert lora.train_minutes == (11.0, 1.0)
    md = (tmp_path / "report" / "report.md").read_text()
    assert md == res["markdown"]
    lines = md.splitlines()
    assert lines[0] == ("| method | runs | seeds | trainable % | train time (min) | "
                        "cmexam acc_loglik | mts_dialog rouge1 |")
    assert lines[2] == "| lora | 3 | 0,1,2 | 0.450 | 11.0 ± 1.0 | 42.00 ± 2.65 | 43.50 ± 0.20 |"
    assert lines[3] == "| full | 1 | 0 | 100.000 | 30.0 | 38.00 | 40.67 |"  # one run: no std
    with (tmp_path / "report" / "report.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["cmexam/acc_loglik_mean"]) == 42.0
    assert float(rows[0]["cmexam/acc_loglik_std"]) == pytest.approx(math.sqrt(7), abs=1e-12)
    assert rows[1]["cmexam/acc_loglik_std"] == ""
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    assert data["groups"][1]["metrics"]["cmexam/acc_loglik"]["std"] is None
    png = tmp_path / "report" / "report.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_groups_by_a_swept_key_and_filters_metrics(tmp_path):
    runs = [fake_run(tmp_path, f"r{r}-s{s}", "lora", s, {"t": {"rouge1": 10.0 * r + s}}, 1.0,
                     60, rank=r) for r in (4, 8) for s in (0, 1)]
    res = build_report(runs, tmp_path / "rep", ["adapter.method", "adapter.lora.r"],
                       ["t/rouge*"])
    assert [r.group for r in res["rows"]] == ["lora r=4", "lora r=8"]
    assert [r.metrics["t/rouge1"][0] for r in res["rows"]] == [40.5, 80.5]


def test_report_cli_rejects_a_folder_without_results(tmp_path, capsys):
    from sparsedoc.cli import main

    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "r")]) == 2
    assert "no evaluation results" in capsys.readouterr().out


def test_sweep_plans_the_grid(capsys, tmp_path):
    from sparsedoc.sweep import main, plan

    runs = plan("moe", [0, 1], tmp_path, "experts", ["2", "4"], ["train.max_steps=5"])
    assert [Path(r.run_dir).name for r in runs] == [
        "moe_num_experts2_seed0", "moe_num_experts2_seed1", "moe_num_experts4_seed0",
        "moe_num_experts4_seed1"]
    assert runs[3].overrides == ["train.max_steps=5", "train.seed=1",
                                 f"train.output_dir={tmp_path / 'moe_num_experts4_seed1'}",
                                 "train.resume_from=auto", "adapter.moe.num_experts=4"]
    with pytest.raises(ValueError, match="does not apply"):
        plan("lora", [0], tmp_path, "experts", ["2"])
    assert main(["prompt", "--out", str(tmp_path), "--seeds", "0,1", "--param", "prompt_tokens",
                 "--values", "10", "--launcher", "deepspeed --num_gpus 8", "--eval-tasks",
                 "cmexam", "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4  # (train, evaluate) x 2 seeds
    assert shlex.split(lines[0])[:7] == ["deepspeed", "--num_gpus", "8", "--module",
                                         "sparsedoc.recipes.train", "--method", "prompt"]
    assert "adapter.prompt.num_virtual_tokens=10" in lines[0]
    first_run = str(tmp_path / "prompt_num_virtual_tokens10_seed0")
    assert shlex.split(lines[1])[1:7] == ["-m", "sparsedoc.recipes.evaluate", "--model", first_run, "--tasks", "cmexam"]


FAKE_TRAINER = '''
import json, sys
from pathlib import Path
from sparsedoc.config import load_config, save_config
args = [a for a in sys.argv[2:] if "=" in a]  # argv[1] is the recipe path
cfg = load_config(None, args + ["adapter.method=lora"])
run = Path(cfg.train.output_dir)
save_config(cfg, run / "config.yaml")
(run / "summary.json").write_text(json.dumps({"trainable_pct": 0.1 * cfg.adapter.lora.r,
                                              "train_seconds": 60.0}))
(run / "eval").mkdir()
score = 10.0 * cfg.adapter.lora.r + cfg.train.seed
(run / "eval" / "t.json").write_text(json.dumps({"task": "t", "metrics": {"acc_loglik": score}}))
'''


def test_sweep_runs_the_grid_skips_finished_runs_and_reports(tmp_path, capsys):
    from sparsedoc.sweep import main

    trainer = tmp_path / "fake_train.py"
    trainer.write_text(FAKE_TRAINER)
    args = ["lora", "--out", str(tmp_path / "sw"), "--seeds", "0,1", "--param", "rank",
            "--values", "4,8", "--launcher", f"{sys.executable} {trainer}"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| lora r=4 | 2 | 0,1 | 0.400 | 1.0 ± 0.0 | 40.50 ± 0.71 |" in out
    assert "| lora r=8 | 2 | 0,1 | 0.800 | 1.0 ± 0.0 | 80.50 ± 0.71 |" in out
    manifest = json.loads((tmp_path / "sw" / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["done"] * 4
    assert manifest["param"] == "adapter.lora.r"
    assert main(args) == 0  # everything trained: nothing is launched again
    assert capsys.readouterr().out.count("trained already, skipped") == 4


def test_sweep_overrides_may_follow_the_options(capsys, tmp_path):
    """As the sweep's docstring writes it: options first, then the key=value overrides."""
    from sparsedoc.sweep import main

    assert main(["lora", "--out", str(tmp_path / "sw"), "--seeds", "0", "--eval-tasks", "x",
                 "--eval-arg", "limit=2", "--dry-run", "train.max_steps=5"]) == 0
    train_cmd = capsys.readouterr().out.splitlines()[0]
    assert "train.max_steps=5" in train_cmd.split() and "limit=2" not in train_cmd.split()
