"""``sparsedoc.loader.load_trained`` on real run folders of every method, checked against the training loop's
own held-out loss; evaluation of a LoRA-MoE run with its routing analysis; the report over the
four methods."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sparsedoc.config import EvalCfg, load_config
from sparsedoc.data.dataset import eval_batches, make_collator, prepare_data
from sparsedoc.data.schema import read_jsonl, write_jsonl
from sparsedoc.loader import load_trained
from sparsedoc.data.batch import model_inputs
from sparsedoc.distributed import free_port

REPO = Path(__file__).resolve().parents[1]
METHODS = {"lora": "lora", "prompt": "prompt", "moe": "lora_moe", "full": "full"}
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tiny_model_dir, toy_data, tmp_path_factory) -> dict[str, Path]:
    """One 3-step run per method on the toy data (lr high enough to move the held-out loss)."""
    root = tmp_path_factory.mktemp("eval-runs")
    train, evals = toy_data
    procs = {}
    for short, method in METHODS.items():  # started together: mostly one-thread start-up work
        run = root / short
        cmd = [sys.executable, str(REPO / "recipes" / f"train_{short}.py"),
               f"model.name_or_path={tiny_model_dir}", f"data.train_files=[{train}]",
               f"data.eval_files=[{evals}]", "data.max_seq_len=64", f"train.output_dir={run}",
               "train.max_steps=3", "train.micro_batch_size=8", "train.save_every=3",
               "train.lr=0.05", "train.warmup_steps=1", "train.lr_schedule=constant",
               "train.eval_every=0", "logging.wandb=false"]
        log = (root / f"{short}.log").open("w")
        procs[method] = (run, log, subprocess.Popen(
            cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}))
    for method, (run, log, proc) in procs.items():
        code = proc.wait(timeout=900)
        log.close()
        assert code == 0, f"{method}: " + (root / f"{run.name}.log").read_text()[-3000:]
    return {method: run for method, (run, _, _) in procs.items()}


@torch.no_grad()
def held_out_loss(model, tokenizer, run: Path) -> float:
    """The training loop's ``evaluate_loss``, recomputed on a loaded model."""
    cfg = load_config(run / "config.yaml")
    data = prepare_data(cfg.data, tokenizer, cfg.train.seed)
    collate = make_collator(cfg.data, tokenizer, data.label_vocab)
    total = count = 0.0
    for batch in eval_batches(data.eval, collate, cfg.train.micro_batch_size, 0, 1):
        n = int((batch["labels"][:, 1:] != -100).sum())
        total += float(model(**model_inputs(batch)).loss) * n
        count += n
    return total / count


@pytest.mark.parametrize("method", list(METHODS.values()))
def test_loaded_run_reproduces_the_trained_models_held_out_loss(runs, method):
    run = runs[method]
    summary = json.loads((run / "summary.json").read_text())
    model, tok, info = load_trained(str(run), dtype="fp32", device="cpu")
    assert info.kind == "run" and info.method == method and info.step == 3
    assert info.checkpoint.endswith("step-000003")
    loss = held_out_loss(model, tok, run)
    assert loss == pytest.approx(summary["eval_loss_final"], abs=1e-4)
    assert abs(summary["eval_loss_final"] - summary["eval_loss_start"]) > 1e-2  # it trained
    # the checkpoint folder itself loads the same weights
    model2, _, info2 = load_trained(info.checkpoint, dtype="fp32", device="cpu")
    assert info2.kind == "checkpoint"
    assert held_out_loss(model2, tok, run) == pytest.approx(loss, abs=1e-6)


def test_adapter_folder_loads_on_the_base_it_names(runs):
    adapter = runs["lora"] / "checkpoints" / "step-000003" / "adapter"
    model, tok, info = load_trained(str(adapter), dtype="fp32", device="cpu")
    assert (info.kind, info.method) == ("adapter", "lora")
    summary = json.loads((runs["lora"] / "summary.json").read_text())
    assert held_out_loss(model, tok, runs["lora"]) == \
        pytest.approx(summary["eval_loss_final"], abs=1e-4)


def _mcq_task(toy_data, tmp: Path) -> Path:
    train, evals = toy_data
    mcq = [r for f in (train, evals) for r in read_jsonl(f) if "options" in r]
    path = tmp / "toymcq" / "test.jsonl"
    write_jsonl(path, mcq)
    return path


def test_evaluate_moe_run_writes_results_and_routing(runs, toy_data, tmp_path):
    from sparsedoc.eval.runner import evaluate

    task = _mcq_task(toy_data, tmp_path)
    cfg = EvalCfg(model=str(runs["lora_moe"]), tasks=[str(task)], dtype="fp32", device="cpu",
                  mcq_scorer="both", mcq_max_new_tokens=4)
    cfg.logging.wandb = False
    res = evaluate(cfg)["toymcq"]
    written = json.loads((runs["lora_moe"] / "eval" / "toymcq.json").read_text())
    assert written["metrics"] == pytest.approx(res["metrics"])
    n = len(read_jsonl(task))
    assert written["data"]["n_scored"] == n and len(written["items"]) == n
    s = written["summary"]["loglik"]
    assert s["correct"] == sum(it["loglik"]["correct"] for it in written["items"])
    assert s["accuracy"] == pytest.approx(100 * s["correct"] / n)
    assert set(s["per_subject"]) == {"cardiology", "neurology"}
    # routing: on the task (two subjects) and on the run's own eval file
    routing = json.loads((runs["lora_moe"] / "eval" / "routing" / "summary.json").read_text())
    assert set(routing) == {"toymcq", "file-eval"}
    for name, r in routing.items():
        assert r["labels"] == ["cardiology", "neurology"]
        assert 0.0 <= r["mi_bits_mean"] <= r["label_entropy_bits"] + 1e-9
        assert r["mi_fraction_mean"] == pytest.approx(r["mi_bits_mean"] / r["label_entropy_bits"])
        assert 0.0 < r["load_entropy_bits_mean"] <= r["load_entropy_max_bits"] + 1e-9
        assert r["balanced_busiest_share"] <= r["busiest_share_mean"] <= r["busiest_share_max"] <= 1
        detail = json.loads((runs["lora_moe"] / "eval" / "routing" / name /
                             "routing.json").read_text())
        k = load_config(runs["lora_moe"] / "config.yaml").adapter.moe.top_k
        tokens = sum(map(sum, next(iter(detail["top1_counts"].values()))))
        for layer, counts in detail["top1_counts"].items():  # every labelled real token, once
            assert sum(map(sum, counts)) == tokens
            assert sum(detail["assigned_counts"][layer]) == k * tokens  # and its k experts
        assert all(Path(p).is_file() and Path(p).stat().st_size > 0 for p in detail["images"])
    assert written["routing"]["labels"] == ["cardiology", "neurology"]


def test_report_over_the_four_methods(runs, toy_data, tmp_path):
    from sparsedoc.eval.report import build_report
    from sparsedoc.eval.runner import evaluate

    task = _mcq_task(toy_data, tmp_path)
    for method, run in runs.items():
        cfg = EvalCfg(model=str(run), tasks=[str(task)], dtype="fp32", device="cpu",
                      output_dir=str(run / "eval"), routing=False, mcq_scorer="both",
                      mcq_max_new_tokens=4)
        cfg.logging.wandb = False
        evaluate(cfg)
    res = build_report(list(runs.values()), tmp_path / "report")
    assert [r.group for r in res["rows"]] == list(runs)
    assert res["metrics"] == ["toymcq/acc_loglik", "toymcq/acc_generate"]
    for row in res["rows"]:
        summary = json.loads((row.runs[0].path / "summary.json").read_text())
        assert row.trainable_pct == pytest.approx(summary["trainable_pct"])
        acc = json.loads((row.runs[0].path / "eval" / "toymcq.json").read_text())["metrics"]
        assert row.metrics["toymcq/acc_loglik"][0] == pytest.approx(acc["acc_loglik"])
    assert "| full | 1 | 0 | 100.000 |" in res["markdown"]


def test_prompt_tuning_loglik_reads_past_the_virtual_tokens(runs):
    from sparsedoc.eval import mcq
    from sparsedoc.loader import prompt_virtual_tokens

    model, tok, _ = load_trained(str(runs["prompt"]), dtype="fp32", device="cpu")
    virtual = prompt_virtual_tokens(model)
    assert virtual == load_config(runs["prompt"] / "config.yaml").adapter.prompt.num_virtual_tokens
    prompt = tok("Which organ does cardiology study? Answer:")["input_ids"]
    conts = {c: tok(" " + c, add_special_tokens=False)["input_ids"] for c in "ABCD"}
    scores = mcq.loglik_scores(model, [prompt], [conts], virtual)[0]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0]  # (virtual + S, V)
    assert logits.shape[0] == virtual + len(prompt)
    logp = torch.log_softmax(logits[-1], -1)
    assert scores == pytest.approx({c: float(logp[t[0]]) for c, t in conts.items()}, abs=1e-5)


@pytest.mark.parametrize("method", list(METHODS.values()))
def test_batched_generation_equals_one_by_one_for_every_method(runs, method):
    from sparsedoc.eval.generation import generate, generation_config

    model, tok, _ = load_trained(str(runs[method]), dtype="fp32", device="cpu")
    prompts = [tok(t)["input_ids"] for t in ("Hi", "What does neurology study? Tell me more.",
                                             "心脏？")]
    gc = generation_config(model, tok, max_new_tokens=5)
    assert generate(model, tok, prompts, gc) == \
        [generate(model, tok, [p], gc)[0] for p in prompts]
