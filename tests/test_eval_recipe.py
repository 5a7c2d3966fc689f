"""``recipes/evaluate.py`` end to end: the embedded SmolLM2-135M on slices of the real samples
(CMExam, CMMLU-Med, PubMedQA, MTS-Dialog), results read back and recomputed; then a resumed run
that reuses cached predictions and adds the second MCQ scorer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsedoc.data.schema import read_jsonl
from sparsedoc.eval.stats import wilson_interval
from sparsedoc.eval.tasks import subset, to_items

REPO = Path(__file__).resolve().parents[1]
TASKS = {"cmexam": "cmexam", "cmmlu_med": "cmmlu_med", "pubmedqa": "pubmedqa",
         "mts_dialog": "mts_dialog"}
LIMIT = 4  # items per task: every scorer runs, and the real model stays quick
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(shared_data, tmp_path_factory) -> Path:
    from sparsedoc.cli import main

    root = tmp_path_factory.mktemp("data")
    for name, folder in TASKS.items():
        assert main(["prepare", name, "--src", str(shared_data / folder), "--out",
                     str(root / name)]) == 0
    return root


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / "recipes" / "evaluate.py"), "--model", "embedded", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def first_run(data_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval")
    proc = _evaluate("--tasks", ",".join(TASKS), "--limit", str(LIMIT), "--data-root",
                     str(data_root), "--out", str(out), "max_new_tokens=16",
                     "logging.log_samples=true")  # references and outputs, read back below
    return out, proc.stdout


def _expected_items(data_root: Path, task: str) -> list:
    split = "validation" if task in ("pubmedqa", "mts_dialog") else "test"
    _, items = to_items(read_jsonl(data_root / task / f"{split}.jsonl"))
    return subset(items, LIMIT, seed=0)


@pytest.mark.parametrize("task", ["cmexam", "cmmlu_med", "pubmedqa"])
def test_mcq_results_read_back(first_run, data_root, task):
    out, stdout = first_run
    res = json.loads((out / f"{task}.json").read_text())
    expected = _expected_items(data_root, task)
    assert res["kind"] == "mcq" and res["data"]["n_scored"] == LIMIT
    assert [it["id"] for it in res["items"]] == [e.id for e in expected]
    assert [it["gold"] for it in res["items"]] == [e.answer for e in expected]
    correct = 0
    for it, e in zip(res["items"], expected):
        lp = it["loglik"]["logprobs"]
        assert set(lp) == set(e.options) and all(v < 0 for v in lp.values())
        assert it["loglik"]["pred"] == max(lp, key=lp.get)
        assert it["loglik"]["correct"] == (it["loglik"]["pred"] == e.answer)
        correct += it["loglik"]["correct"]
    s = res["summary"]["loglik"]
    assert (s["n"], s["correct"]) == (LIMIT, correct)
    assert res["metrics"]["acc_loglik"] == s["accuracy"] == pytest.approx(100 * correct / LIMIT)
    lo, hi = wilson_interval(correct, LIMIT)
    assert s["ci95"] == pytest.approx([100 * lo, 100 * hi])
    assert sum(v["n"] for v in s["per_subject"].values()) == LIMIT
    assert s["cached"] == 0 and res["timing"]["loglik"] > 0
    assert task in stdout and "acc_loglik" in stdout


def test_pubmedqa_is_a_three_way_choice(first_run, data_root):
    out, _ = first_run
    res = json.loads((out / "pubmedqa.json").read_text())
    records = {r["id"]: r for r in read_jsonl(data_root / "pubmedqa" / "validation.jsonl")}
    for it in res["items"]:
        assert set(it["loglik"]["logprobs"]) == {"A", "B", "C"}
        assert "ABC"[["yes", "no", "maybe"].index(records[it["id"]]["meta"]["answer"])] == \
            it["gold"]


def test_generation_results_read_back(first_run, data_root):
    from rouge_score import rouge_scorer

    out, stdout = first_run
    res = json.loads((out / "mts_dialog.json").read_text())
    expected = _expected_items(data_root, "mts_dialog")
    assert res["kind"] == "generation" and len(res["items"]) == LIMIT
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
                                      use_stemmer=True)
    for it, e in zip(res["items"], expected):
        assert it["reference"] == e.reference and it["new_tokens"] <= 16
        ref = scorer.score(it["reference"], it["prediction"])
        assert it["rouge1"] == pytest.approx(ref["rouge1"].fmeasure)
        assert it["rougeL"] == pytest.approx(ref["rougeL"].fmeasure)
        assert 0.0 < it["bertscore_f1"] < 1.0
    s = res["summary"]["text"]
    for k in ("rouge1", "rouge2", "rougeL", "bertscore_f1"):
        mean = 100 * sum(it[k] for it in res["items"]) / LIMIT
        assert s[k] == pytest.approx(mean) == pytest.approx(res["metrics"][k])
        assert s[f"{k}_ci95"][0] <= s[k] <= s[f"{k}_ci95"][1]
    assert s["bertscore"]["en"]["num_layers"] == 6
    assert any("all-MiniLM-L6-v2" in n for n in res["notes"])
    assert "rouge1" in stdout and "bertscore_f1" in stdout


def test_metrics_logged_and_wandb_offline_run(first_run):
    out, _ = first_run
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = {k: v for r in rows for k, v in r.items()}
    for task in TASKS:
        res = json.loads((out / f"{task}.json").read_text())
        for k, v in res["metrics"].items():
            assert logged[f"eval/{task}/{k}"] == pytest.approx(v)
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0


def test_resume_reuses_cached_predictions_and_adds_a_scorer(first_run, data_root):
    out, _ = first_run
    before = json.loads((out / "cmmlu_med.json").read_text())
    _evaluate("--tasks", "cmmlu_med", "--limit", str(LIMIT), "--data-root", str(data_root),
              "--out", str(out), "--scorer", "both", "mcq_max_new_tokens=8", "logging.wandb=false")
    after = json.loads((out / "cmmlu_med.json").read_text())
    assert after["summary"]["loglik"]["cached"] == LIMIT
    assert [it["loglik"] for it in after["items"]] == [it["loglik"] for it in before["items"]]
    gen = after["summary"]["generate"]
    assert gen["cached"] == 0 and gen["n"] == LIMIT
    assert gen["unparsed"] == sum(not it["generate"]["parsed"] for it in after["items"])
    assert gen["correct"] == sum(it["generate"]["correct"] for it in after["items"])
    assert after["metrics"]["acc_generate"] == pytest.approx(100 * gen["correct"] / LIMIT)
