"""Record text and secrets stay out of everything a run writes.

Records carry a planted unique string and the environment a planted fake API key (as
``WANDB_API_KEY``, ``HF_TOKEN`` and a ``*_KEY``); a tiny run is trained (W&B offline on),
evaluated and exported through the command line, and every file written (the W&B offline
folder, W&B's config and cache folders and the temp folder included) and everything printed is
scanned for both. A positive control proves the scan finds the string where the user opted in
(``logging.log_samples``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsedoc.data.schema import write_jsonl

REPO = Path(__file__).resolve().parents[1]
PLANTED = "Zqxj7PlantedPatient4711"  # one token-free, unique string in every record's text
SECRET = "sk-fake-9c1e2b7d4a-SECRET"
ENV_SECRETS = {"WANDB_API_KEY": SECRET + "-wandb", "HF_TOKEN": SECRET + "-hf",
               "HOSPITAL_DB_KEY": SECRET + "-db"}


def _records(n: int, start: int = 0) -> list[dict]:
    out = []
    for i in range(start, start + n):
        label = ("cardiology", "neurology")[i % 2]
        out.append({"id": f"p-{i}", "messages": [
            {"role": "user", "content": f"Patient {PLANTED} case {i}: chest pain for 3 days."},
            {"role": "assistant", "content": f"Record of {PLANTED}: order an ECG ({label})."}],
            "meta": {"source": "ward", "task": "qa", "lang": "en", "label": label}})
    return out


def _mcq(n: int) -> list[dict]:
    return [{"id": f"q-{i}", "question": f"{PLANTED} presents with chest pain ({i}). Next step?",
             "options": {"A": f"ECG for {PLANTED}", "B": "discharge"}, "answer": "A",
             "explanation": f"{PLANTED} needs an ECG.",
             "meta": {"source": "ward", "subject": "cardiology", "lang": "en"}}
            for i in range(n)]


def _scan(root: Path, needles: list[str]) -> list[str]:
    hits = []
    for f in root.rglob("*"):
        if f.is_file() and not f.is_symlink():
            data = f.read_bytes()
            hits += [f"{f.relative_to(root)}: {n!r}" for n in needles if n.encode() in data]
    return hits


@pytest.fixture(scope="module")
def run_everything(tiny_model_dir, tmp_path_factory):
    inputs, out = tmp_path_factory.mktemp("inputs"), tmp_path_factory.mktemp("written")
    write_jsonl(inputs / "train.jsonl", _records(16))
    write_jsonl(inputs / "eval.jsonl", _records(4, start=100))
    write_jsonl(inputs / "tasks" / "ward_mcq" / "test.jsonl", _mcq(4))
    write_jsonl(inputs / "tasks" / "ward_notes" / "test.jsonl", _records(2, start=200))
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(ENV_SECRETS, OMP_NUM_THREADS="1", WANDB_MODE="offline", HF_HUB_OFFLINE="1",
               WANDB_SILENT="false", TMPDIR=str(out / "tmp"), WANDB_DIR=str(out / "wandb_dir"),
               WANDB_CONFIG_DIR=str(out / "wandb_config"), WANDB_CACHE_DIR=str(out / "wandb_cache"),
               WANDB_DATA_DIR=str(out / "wandb_data"))
    (out / "tmp").mkdir()
    run = out / "run"
    printed = []

    def cli(*args: str) -> None:
        proc = subprocess.run([sys.executable, "-m", "sparsedoc.cli", *args], cwd=out, env=env,
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        printed.append(proc.stdout + proc.stderr)

    common = [f"model.name_or_path={tiny_model_dir}", f"data.train_files=[{inputs / 'train.jsonl'}]",
              f"data.eval_files=[{inputs / 'eval.jsonl'}]", f"train.output_dir={run}",
              "train.micro_batch_size=4", "train.max_steps=2", "train.save_every=2",
              "train.eval_every=1", "train.log_every=1", "logging.wandb=true",
              "logging.mode=offline"]
    cli("train", "lora", *common)
    tasks = ["--data-root", str(inputs / "tasks"), "--tasks", "ward_mcq,ward_notes",
             "--limit", "4", "bertscore=false", "max_new_tokens=4", "mcq_scorer=both",
             "mcq_max_new_tokens=4"]
    cli("evaluate", "--model", str(run), "--out", str(out / "eval"), *tasks)
    cli("export", str(run), str(out / "export"))
    # positive control: the user opts in to samples in a separate folder, outside the scan
    control = tmp_path_factory.mktemp("opted_in")
    cli("evaluate", "--model", str(run), "--out", str(control), *tasks,
        "logging.log_samples=true", "logging.wandb=false")
    return out, printed, control


def test_no_record_text_or_secret_in_any_file_written(run_everything):
    out, _, _ = run_everything
    written = [p for p in out.rglob("*") if p.is_file()]
    wandb_files = [p for p in written if "wandb" in p.parts[len(out.parts)]
                   or any(part.startswith("offline-run-") for part in p.parts)]
    assert any(p.suffix == ".wandb" for p in wandb_files), "W&B wrote no offline run to scan"
    assert (out / "run" / "metrics.jsonl").is_file() and (out / "eval" / "ward_notes.json").is_file()
    assert (out / "export" / "README.md").is_file()  # the model card
    hits = _scan(out, [PLANTED, SECRET])
    assert not hits, "\n".join(hits)


def test_nothing_printed_carries_record_text_or_a_secret(run_everything):
    _, printed, _ = run_everything
    for text in printed:
        assert PLANTED not in text and SECRET not in text


def test_the_scan_finds_text_where_the_user_opted_in(run_everything):
    """log_samples=true writes references and outputs: the scan above would have seen them."""
    _, _, control = run_everything
    hits = _scan(control, [PLANTED])
    assert any("ward_notes.json" in h for h in hits), hits


def test_secrets_pasted_into_a_config_are_redacted(monkeypatch, capsys, tmp_path):
    """The resolved config is redacted wherever it goes: config.yaml, W&B, the dry run."""
    import yaml

    from sparsedoc.config import config_to_dict, load_config, save_config
    from sparsedoc.privacy import REDACTED
    from sparsedoc.train.recipe import run_recipe

    monkeypatch.setenv("HOSPITAL_DB_KEY", SECRET)
    monkeypatch.setenv("SHORT_TOKEN", "1")  # too short to be a secret: a setting
    overrides = [f"logging.run_name=run-{SECRET}", "logging.tags=[a,1]"]
    cfg = load_config(None, overrides)
    plain = config_to_dict(cfg)
    assert plain["logging"]["run_name"] == REDACTED and plain["logging"]["tags"] == ["a", "1"]
    save_config(cfg, tmp_path / "config.yaml")
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["logging"]["run_name"] \
        == REDACTED
    run_recipe("lora", ["--dry-run", *overrides])
    printed = capsys.readouterr().out
    assert f"run_name: '{REDACTED}'" in printed and SECRET not in printed
