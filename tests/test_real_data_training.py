"""Real converted data through the tokenizer and into the MoE recipe (issue: real medical data)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from sparsedoc.config import ModelCfg
from sparsedoc.data.schema import read_jsonl
from sparsedoc.data.tokenize import IGNORE_INDEX, tokenize_records
from sparsedoc.logging import read_metrics
from sparsedoc.models.load import load_tokenizer, resolve_model_path

REPO = Path(__file__).resolve().parents[1]


def prepare(*argv: str) -> None:
    from sparsedoc.cli import main

    assert main(["prepare", *argv]) == 0


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return load_tokenizer(resolve_model_path(ModelCfg()))


@pytest.fixture(scope="module")
def converted(shared_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("converted")
    prepare("chinese_medical_dialogue", "--src", str(shared_data / "chinese_medical_dialogue"),
            "--out", str(out / "toyhom"))
    prepare("bentsao", "--src", str(shared_data / "bentsao_huatuo_llama_med"),
            "--out", str(out / "bentsao"))
    prepare("cmexam", "--src", str(shared_data / "cmexam"), "--out", str(out / "cmexam"))
    prepare("mts_dialog", "--src", str(shared_data / "mts_dialog"), "--out", str(out / "mts"))
    prepare("cmb", "--src", str(shared_data / "cmb"), "--out", str(out / "cmb"))
    return out


@pytest.mark.parametrize("dataset", ["mts/train.jsonl", "toyhom/train.jsonl", "cmb/test.jsonl",
                                     "cmexam/validation.jsonl"])
def test_converted_records_train_only_on_answers(converted, smollm2_tokenizer, dataset):
    records = read_jsonl(converted / dataset)[:5]
    rows, stats = tokenize_records(records, smollm2_tokenizer, max_seq_len=32768)
    assert stats.truncated == 0
    assert stats.records == 5 and not stats.skipped
    for rec, row in zip(records, rows):
        kept = smollm2_tokenizer.decode([t for t in row.labels if t != IGNORE_INDEX])
        if "messages" in rec:
            answers = [m["content"] for m in rec["messages"] if m["role"] == "assistant"]
        else:  # MCQ: "答案：X" (+ explanation)
            answers = [f"答案：{rec['answer']}"]
        # exactly the assistant turns, each closed by the template's end-of-turn token
        assert kept.replace("<|im_end|>\n", "") .startswith(answers[0][:20])
        assert kept.count("<|im_end|>") == len(answers)
        for a in answers:
            assert a.strip()[:30] in kept
        user = [m["content"] for m in rec.get("messages", []) if m["role"] == "user"]
        for u in user:
            if u.strip() and u.strip() not in " ".join(answers):
                assert u.strip()[:30] not in kept


@pytest.mark.slow
def test_moe_recipe_trains_on_a_real_mixture(converted, tiny_model_dir, tmp_path):
    mix_cfg = {"seed": 0, "total": 120, "sources": [
        {"path": str(converted / "toyhom" / "train.jsonl"), "weight": 0.5},
        {"path": str(converted / "bentsao" / "train.jsonl"), "weight": 0.3},
        {"path": str(converted / "cmexam" / "validation.jsonl"), "weight": 0.2,
         "mcq_to_chat": True}]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mix_cfg))
    prepare("mixture", str(tmp_path / "mix.yaml"), "--out", str(tmp_path / "mix"))
    run = tmp_path / "run"
    cmd = [sys.executable, str(REPO / "recipes" / "train_moe.py"),
           f"model.name_or_path={tiny_model_dir}",
           f"data.train_files=[{tmp_path / 'mix' / 'train.jsonl'}]", "data.eval_files=[]",
           "data.eval_fraction=0.1", "data.max_seq_len=128", f"train.output_dir={run}",
           "train.max_steps=3", "train.micro_batch_size=4", "train.log_every=1",
           "train.eval_every=3", "logging.wandb=false"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3]
    assert any("eval/loss" in r for r in rows)
    manifest = json.loads((run / "data_manifest.json").read_text())
    assert manifest == json.loads((tmp_path / "mix" / "manifest.json").read_text())
    stats = json.loads((run / "data_stats.json").read_text())
    assert stats["train"]["records"] + stats["eval"]["records"] == 120
    assert stats["train"]["truncated"] > 0  # long dialogues at max_seq_len=128: counted
    assert stats["train"]["turns_dropped"] + stats["train"]["turns_cut"] > 0
    # the same counts in the run summary and in the start-up log
    summary = json.loads((run / "summary.json").read_text())
    for split in ("train", "eval"):
        assert summary["data"][split] == {k: stats[split][k] for k in (
            "records", "truncated", "turns_dropped", "turns_cut", "skipped")}
    s = stats["train"]
    assert (f"data train: {s['records']} records -> {s['records'] - s['skipped']} kept, "
            f"{s['truncated']} shortened to max_seq_len=128 with the target whole "
            f"({s['turns_dropped']} turns dropped, {s['turns_cut']} cut inside a turn), "
            f"{s['skipped']} skipped") in proc.stdout
