"""The model card of an export: lineage read from the run, licenses, dense warning, verification.

Fast: fake run folders (with a data manifest written by the real mixture builder) and no model,
except the last test, which trains the demo recipe for 4 steps on a tiny random Llama.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from sparsedoc.prep.mixture import MixSource, MixtureConfig, build_mixture
from sparsedoc.prep.registry import REGISTRY
from sparsedoc.data.schema import write_jsonl
from sparsedoc.export.card import write_model_card
from sparsedoc.export.lineage import DEMO_LICENSE, collect_lineage, is_non_commercial

REPO = Path(__file__).resolve().parents[1]

VERIFICATION = {"passed": True, "max_abs_logit_diff": 1.2e-5, "mean_abs_logit_diff": 3e-7,
                "tolerance": 1e-3, "greedy_match": True, "samples": 4,
                "reference": "training-time model (sparsedoc LoRA-MoE, fp32)"}
GAP = {"max_abs_logit_diff": 0.8731, "mean_abs_logit_diff": 0.0412, "ppl_routed": 5.4321,
       "ppl_dense": 5.9876, "mcq_acc_routed": 62.5, "mcq_acc_dense": 56.25, "mcq_items": 16,
       "eval_records": 64}


# ---- fixtures: converted data, a mixture, a run --------------------------------------------------
def _converted(root: Path, name: str, license_text: str, non_commercial: bool) -> Path:
    """A converted set as ``sparsedoc prepare`` leaves it: records + conversion manifest."""
    folder = root / name
    records = [{"id": f"{name}-{i}", "messages": [
        {"role": "user", "content": f"{name} question {i}?"},
        {"role": "assistant", "content": f"{name} answer {i}."}],
        "meta": {"source": name, "task": "qa", "lang": "en", "label": "cardiology"}}
        for i in range(6)]
    write_jsonl(folder / "train.jsonl", records)
    manifest = {"kind": "conversion", "created_by": f"sparsedoc.prep.{name}", "source": name,
                "title": name, "license": license_text, "non_commercial": non_commercial,
                "src": f"/data/{name}", "hf": None, "inputs": [],
                "outputs": {"train": {"path": "train.jsonl", "records": len(records)}}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder / "train.jsonl"


def _mixture(root: Path, licenses: dict[str, tuple[str, bool]]) -> Path:
    sources = [MixSource(path=str(_converted(root / "converted", name, lic, nc)), weight=1.0,
                         name=name) for name, (lic, nc) in licenses.items()]
    build_mixture(MixtureConfig(sources=sources, seed=0), root / "mix")
    return root / "mix" / "train.jsonl"


def _base_model(root: Path, license_id: str) -> Path:
    folder = root / "base"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text(f"---\nlicense: {license_id}\n---\n# a base model\n")
    return folder


def make_run(root: Path, licenses: dict[str, tuple[str, bool]], base_license="apache-2.0",
             extra_train_files: tuple[str, ...] = ()) -> Path:
    """A finished LoRA-MoE run folder as the trainer leaves it (4 steps, one checkpoint)."""
    train = _mixture(root, licenses)
    base = _base_model(root, base_license)
    run = root / "run"
    ckpt = run / "checkpoints" / "step-000004"
    (ckpt / "adapter").mkdir(parents=True)
    config = {"model": {"name_or_path": str(base)},
              "adapter": {"method": "lora_moe", "moe": {"num_experts": 4, "top_k": 2, "r": 8}},
              "data": {"train_files": [str(train), *extra_train_files], "eval_files": [],
                       "max_seq_len": 256},
              "train": {"output_dir": str(run), "seed": 0, "micro_batch_size": 2,
                        "grad_accum": 1, "lr": 0.001}}
    for folder in (run, ckpt):
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "summary.json").write_text(json.dumps({
        "method": "lora_moe", "steps": 4, "world_size": 1, "train_seconds": 12.5,
        "trainable_params": 123456, "total_params": 9876543, "trainable_pct": 1.25,
        "eval_loss_start": 3.2101, "eval_loss_final": 2.8765}))
    (run / "data_stats.json").write_text(json.dumps({"train": {"records": 12, "tokens": 480}}))
    shutil.copy(train.parent / "manifest.json", run / "data_manifest.json")  # as the loop does
    (run / "metrics.jsonl").write_text(
        '{"step": 0, "eval/loss": 3.2101}\n{"step": 4, "train/loss": 3.0}\n'
        '{"step": 4, "eval/loss": 2.8765}\n')
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 4, "method": "lora_moe"}))
    (ckpt / "adapter" / "adapter_config.json").write_text(json.dumps({
        "format": "sparsedoc-lora-moe", "base_model": str(base),
        "moe": {"num_experts": 4, "top_k": 2, "r": 8}, "modules": ["a", "b", "c"]}))
    (ckpt / "adapter" / "adapter_model.safetensors").write_bytes(b"")
    return run


def _eval_result(step: int, acc: float) -> dict:
    return {"task": "medqa", "kind": "mcq", "data": {"split": "test", "n_scored": 50},
            "model": {"step": step}, "metrics": {"acc_loglik": acc},
            "summary": {"loglik": {"n": 50, "accuracy": acc, "ci95": [acc - 9.0, acc + 9.0],
                                   "settings": {"num_fewshot": 0}}},
            "items": [{"id": "secret-item", "prediction": "RAW TEXT"}]}


def _card(run: Path, tmp: Path, **info) -> tuple[dict, str]:
    """(front matter, body) of the card written for ``run``'s checkpoint."""
    lineage = collect_lineage(run / "checkpoints" / "step-000004")
    out = tmp / "export"
    out.mkdir(exist_ok=True)
    full = {"mode": "routed", "method": "lora_moe", "base_model": lineage["config"]["model"][
        "name_or_path"], "dtype": "fp32", "source": str(run), "step": 4,
        "adapter_config": {"num_experts": 4, "top_k": 2, "r": 8},
        "verification": VERIFICATION, "dense_gap": None, "export_seconds": 3.5,
        "size_bytes": 5 * 2**20, "lineage": lineage, **info}
    path = write_model_card(out, full)
    assert path == out / "README.md"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


NC_MIX = {"cmmlu_like": ("CC BY-NC-SA 4.0", True), "pubmedqa_like": ("MIT", False)}
OPEN_MIX = {"mts_like": ("CC BY 4.0", False), "pubmedqa_like": ("MIT", False)}


# ---- lineage -------------------------------------------------------------------------------------
def test_run_checkpoint_and_adapter_folder_find_the_same_run(tmp_path):
    run = make_run(tmp_path, NC_MIX)
    ckpt = run / "checkpoints" / "step-000004"
    found = {kind: collect_lineage(path) for kind, path in
             (("run", run), ("checkpoint", ckpt), ("adapter", ckpt / "adapter"))}
    for kind, lin in found.items():
        assert lin["source_kind"] == kind
        assert lin["run_dir"] == str(run.resolve())
        assert lin["checkpoint"] == str(ckpt.resolve())
        assert lin["step"] == 4
        assert lin["summary"]["train_seconds"] == 12.5
        assert lin["config"]["adapter"]["moe"]["num_experts"] == 4
        assert [m["file"] for m in lin["data_manifests"]] == ["data_manifest.json"]
        assert lin["held_out_loss"]["at_export_step"] == pytest.approx(2.8765)
        assert lin["adapter_modules"] == 3 and "modules" not in lin["adapter_meta"]
        json.dumps(lin)  # the exporter may store it in export_metadata.json
    rows = {d["name"]: d for d in found["run"]["datasets"]}
    assert rows["cmmlu_like"]["license"] == "CC BY-NC-SA 4.0"
    assert rows["cmmlu_like"]["non_commercial"] is True
    assert rows["pubmedqa_like"]["license"] == "MIT"
    assert rows["pubmedqa_like"]["records"] == 6  # selected into the mixture


def test_bare_adapter_folder_has_no_run_and_the_card_still_renders(tmp_path):
    folder = tmp_path / "lora"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    lin = collect_lineage(folder)
    assert lin["source_kind"] == "adapter" and lin["run_dir"] is None and lin["step"] is None
    text = write_model_card(tmp_path, {"mode": "merged", "method": "lora",
                                       "lineage": lin}).read_text()
    assert "Training data: not recorded" in text
    assert "peft_type: LORA" in text  # the adapter config comes from the adapter folder


def test_eval_results_of_the_exported_step_only(tmp_path):
    run = make_run(tmp_path, OPEN_MIX)
    (run / "eval").mkdir()
    (run / "eval" / "medqa.json").write_text(json.dumps(_eval_result(4, 61.25)))
    (run / "eval" / "metrics.jsonl").write_text('{"step": 4}\n')
    (run / "eval" / "step-000002").mkdir()
    (run / "eval" / "step-000002" / "medqa.json").write_text(json.dumps(_eval_result(2, 33.0)))
    (run / "eval" / "step-000004").mkdir()
    (run / "eval" / "step-000004" / "pubmedqa.json").write_text(json.dumps(
        {**_eval_result(4, 70.5), "task": "pubmedqa"}))
    lin = collect_lineage(run)
    assert sorted(r["task"] for r in lin["eval"]) == ["medqa", "pubmedqa"]
    assert lin["eval_other_steps"] == 0  # step-000002/ belongs to another checkpoint: not read
    (run / "eval" / "cmexam.json").write_text(json.dumps({**_eval_result(2, 40.0),
                                                          "task": "cmexam"}))
    lin = collect_lineage(run)
    assert lin["eval_other_steps"] == 1  # a run-level result of an earlier step
    _, body = _card(run, tmp_path)
    evaluation = body.split("## Evaluation", 1)[1].split("## ", 1)[0]
    assert "| medqa | test | 50 | acc_loglik | 61.25 | [52.25, 70.25] |" in evaluation
    assert "70.50" in evaluation and "40.00" not in evaluation and "33.00" not in evaluation
    assert "RAW TEXT" not in body  # per-item predictions never reach the card


# ---- licenses ------------------------------------------------------------------------------------
def test_non_commercial_source_puts_a_notice_on_top_and_license_other(tmp_path):
    front, body = _card(make_run(tmp_path, NC_MIX), tmp_path)
    assert front["license"] == "other" and front["license_name"]
    assert front["pipeline_tag"] == "text-generation"
    assert {"sparsedoc", "medical", "lora-moe"} <= set(front["tags"])
    assert "library_name" not in front  # routed needs sparsedoc, not bare transformers
    top = body.split("## How to load")[0]
    assert "Non-commercial use only" in top and "cmmlu_like" in top
    licenses = body.split("## Licenses", 1)[1]
    assert "CC BY-NC-SA 4.0" in licenses and "MIT" in licenses
    assert "apache-2.0 (from the" in licenses  # the base folder's README front matter


def test_permissive_data_keeps_the_base_license_and_no_notice(tmp_path):
    front, body = _card(make_run(tmp_path, OPEN_MIX), tmp_path, mode="merged", method="lora")
    assert front["license"] == "apache-2.0" and "license_name" not in front
    assert front["library_name"] == "transformers"
    assert {"sparsedoc", "medical", "lora"} <= set(front["tags"])
    assert "non-commercial" not in body.lower()
    assert "CC BY 4.0" in body and "MIT" in body


def test_non_commercial_base_model_alone_is_enough(tmp_path):
    front, body = _card(make_run(tmp_path, OPEN_MIX, base_license="cc-by-nc-4.0"), tmp_path)
    assert front["license"] == "other"
    assert "Non-commercial use only" in body.split("## How to load")[0]


def test_training_file_without_manifest_is_unknown_not_guessed(tmp_path):
    run = make_run(tmp_path, OPEN_MIX, extra_train_files=("/data/private/notes.jsonl",))
    front, body = _card(run, tmp_path)
    assert front["license"] == "other" and "unknown" in front["license_name"]
    assert "| notes.jsonl | train | not recorded | unknown (not recorded) |" in body
    assert "Non-commercial use only" not in body


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_non_commercial_detection_agrees_with_the_dataset_registry(name):
    info = REGISTRY[name]
    assert is_non_commercial(info.license) == info.non_commercial, info.license


def test_demo_license_is_the_one_its_readme_and_the_project_state():
    readme = (REPO / "sparsedoc" / "prep" / "demo" / "README.md").read_text()
    assert f"released under the project's license, {DEMO_LICENSE}" in readme
    assert f'license = "{DEMO_LICENSE}"' in (REPO / "pyproject.toml").read_text()


# ---- what the card says --------------------------------------------------------------------------
def test_dense_card_warns_and_shows_the_measured_gap(tmp_path):
    gap = {**GAP, "mcq_acc_routed": None, "mcq_acc_dense": None, "mcq_items": 0}
    front, body = _card(make_run(tmp_path, OPEN_MIX), tmp_path, mode="dense", dense_gap=gap,
                        verification={**VERIFICATION, "reference":
                                      "in-memory dense approximation (fp32)"})
    assert "approximate" in front["tags"] and front["library_name"] == "transformers"
    top = body.split("## How to load")[0]
    assert "**APPROXIMATE.**" in top
    for number in ("5.432", "5.988", "0.873", "0.0412", "64 held-out records"):
        assert number in top, number
    assert "| MCQ accuracy, % (0 items) | not recorded | not recorded |" in top


def test_verification_numbers_flat_and_as_the_exporter_nests_them(tmp_path):
    run = make_run(tmp_path, OPEN_MIX)
    _, body = _card(run, tmp_path)
    section = body.split("## Verification", 1)[1].split("## ", 1)[0]
    assert "**PASSED**" in section and "tolerance on max |logit diff|: 0.001" in section
    assert "| 1.2e-05 | 3e-07 | identical |" in section
    nested = {"reference": "training-time model (lora_moe, fp32)", "tolerance": 1e-3,
              "dtype": "bf16", "samples": 4, "sample_tokens": 312, "passed": True,
              "in_memory": {"max_abs_logit_diff": 2.5e-6, "mean_abs_logit_diff": 1e-7,
                            "greedy_match": True, "greedy_prompts_matching": 4,
                            "greedy_prompts": 4},
              "reloaded": {"max_abs_logit_diff": 0.0625, "mean_abs_logit_diff": 0.0071,
                           "greedy_match": False, "greedy_prompts_matching": 3,
                           "greedy_prompts": 4},
              "weights": {"weights_equal": True, "tensors": 273},
              "note": "bf16 export: rounding is reported, not enforced"}
    _, body = _card(run, tmp_path, verification=nested, dtype="bf16")
    section = body.split("## Verification", 1)[1].split("## ", 1)[0]
    assert "| in-memory export vs reference | 2.5e-06 | 1e-07 | 4/4 identical |" in section
    assert "| 0.0625 | 0.0071 | 3/4 identical |" in section
    assert "(312 tokens)" in section and "True (273 tensors)" in section
    assert "bf16 export: rounding" in section
    _, body = _card(run, tmp_path, verification={**VERIFICATION, "passed": False})
    assert "Verification FAILED" in body.split("## How to load")[0]


def test_training_facts_and_load_snippets(tmp_path):
    run = make_run(tmp_path, OPEN_MIX)
    _, body = _card(run, tmp_path)
    assert "12 s (0.2 min)" in body and "3.2101 before training -> 2.8765" in body
    assert "123,456 of 9,876,543" in body and "this export is step 4" in body
    assert "num_experts: 4" in body.split("## Adapter configuration", 1)[1]
    assert "sparsedoc.load_pretrained(path" in body and "trust_remote_code" in body
    _, body = _card(run, tmp_path, mode="mixtral")
    assert "AutoModelForCausalLM.from_pretrained(path" in body and "vllm serve" in body
    _, body = _card(run, tmp_path, load_snippet="print('custom loader')\n")
    assert "print('custom loader')" in body


def test_missing_fields_say_not_recorded(tmp_path):
    path = write_model_card(tmp_path, {"mode": "merged", "verification": None,
                                       "dense_gap": None, "lineage": None})
    text = path.read_text()
    front = yaml.safe_load(text[4:].split("\n---\n", 1)[0])
    assert front["license"] == "other" and front["pipeline_tag"] == "text-generation"
    assert "Verification: not recorded." in text
    assert "training step: not recorded" in text
    assert "see the base model's card" in text
    text = write_model_card(tmp_path, {"mode": "dense"}).read_text()
    assert "APPROXIMATE" in text and "Measured gap: not recorded." in text


# ---- a real demo run -----------------------------------------------------------------------------
def _train_demo_run(tiny_model_dir: Path, root: Path) -> Path:
    """A run folder made by the trainer itself: the demo recipe with its own config (the embedded
    base, the bundled demo set), cut to 4 steps, with the tiny random Llama standing in for the
    embedded SmolLM2 in the embedded model's cache folder (no 135M model is trained here)."""
    import os
    import subprocess
    import sys

    from sparsedoc.models.load import EMBEDDED_DIRNAME

    cache = root / "cache"
    shutil.copytree(tiny_model_dir, cache / EMBEDDED_DIRNAME)
    run = root / "moe-demo"
    cmd = [sys.executable, str(REPO / "recipes" / "train_moe.py"), f"model.cache_dir={cache}",
           f"train.output_dir={run}", "train.max_steps=4", "train.micro_batch_size=4",
           "train.warmup_steps=1", "train.eval_every=4", "train.eval_batches=1",
           "train.save_every=4", "train.log_every=1", "logging.wandb=false"]
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return run


@pytest.mark.slow  # trains (a tiny model, in a subprocess), like test_resume.py
def test_card_of_a_real_demo_run(tiny_model_dir, tmp_path):
    run = _train_demo_run(tiny_model_dir, tmp_path)
    lineage = collect_lineage(run)
    assert lineage["step"] == 4
    assert Path(lineage["summary"]["model"]).parent == tmp_path / "cache"  # the tiny stand-in
    assert [d["name"] for d in lineage["datasets"] if d["role"] == "train"] == [
        "sparsedoc demo set"]
    text = write_model_card(tmp_path, {"mode": "routed", "method": "lora_moe",
                                       "base_model": lineage["summary"]["model"],
                                       "step": lineage["step"], "lineage": lineage}).read_text()
    front = yaml.safe_load(text[4:].split("\n---\n", 1)[0])
    assert front["license"] == "apache-2.0"
    assert front["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert f"train data sparsedoc demo set: {DEMO_LICENSE}" in text
    assert f"step {lineage['step']}" in text
    assert "Non-commercial" not in text
