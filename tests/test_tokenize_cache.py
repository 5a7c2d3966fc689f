"""The tokenize cache (sparsedoc/data/cache.py) gives exactly the rows of the in-memory path,
is rebuilt when anything that decides the rows changes, and is built once by processes that
start together."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsedoc.config import DataCfg, ModelCfg
from sparsedoc.data.cache import COMPLETE, TokenizeSettings, cache_key, tokenized_file
from sparsedoc.data.dataset import prepare_data, train_loader, make_collator
from sparsedoc.models.load import load_tokenizer, resolve_model_path

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(resolve_model_path(ModelCfg()))


@pytest.fixture(scope="module")
def converted(shared_data, tmp_path_factory) -> Path:
    from sparsedoc.cli import main

    out = tmp_path_factory.mktemp("converted")
    for name, src, dst in [("mts_dialog", "mts_dialog", "mts"), ("cmexam", "cmexam", "cmexam")]:
        assert main(["prepare", name, "--src", str(shared_data / src), "--out",
                     str(out / dst)]) == 0
    # the first records of each split, as released: enough for every code path, quick to tokenize
    for f in (out / "mts" / "train.jsonl", out / "cmexam" / "validation.jsonl"):
        f.write_text("".join(f.read_text().splitlines(keepends=True)[:200]))
    return out


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tokenize_cache")


def rows(examples) -> list[tuple]:
    return [(e.input_ids, e.labels, e.label, e.record_id, e.position_ids, e.pieces)
            for e in examples]


@pytest.mark.parametrize("variant", ["eval_files", "eval_fraction", "packing"])
def test_cached_rows_equal_the_in_memory_rows(converted, tokenizer, cache_dir, variant):
    """Real converted sets (English notes, Chinese exam questions), a max length that shortens
    and skips some records: ids, labels, masks, splits and the data report all agree."""
    cfg = DataCfg(train_files=[str(converted / "mts" / "train.jsonl"),
                               str(converted / "cmexam" / "validation.jsonl")],
                  eval_files=[str(converted / "cmexam" / "test.jsonl")],
                  max_seq_len=160, max_target_len=96, cache_dir=str(cache_dir),
                  num_proc=2)
    if variant == "eval_fraction":
        cfg = dataclasses.replace(cfg, eval_files=[], eval_fraction=0.2)
    if variant == "packing":
        cfg = dataclasses.replace(cfg, packing=True)
    memory = prepare_data(dataclasses.replace(cfg, tokenize_cache="never"), tokenizer, seed=3)
    cached = prepare_data(dataclasses.replace(cfg, tokenize_cache="always"), tokenizer, seed=3)
    assert rows(cached.train) == rows(memory.train)
    assert rows(cached.eval) == rows(memory.eval)
    assert cached.stats == memory.stats and cached.label_vocab == memory.label_vocab
    assert memory.stats["train"]["skipped"] > 0 and memory.stats["train"]["truncated"] > 0
    assert len(memory.eval) > 0
    if variant != "packing":  # the length-grouped batches come out the same too
        collate = make_collator(cfg, tokenizer, memory.label_vocab)
        a = [b["input_ids"].tolist() for b in train_loader(memory.train, collate, 4, 0, 2, 3)]
        b = [b["input_ids"].tolist() for b in train_loader(cached.train, collate, 4, 0, 2, 3)]
        assert a == b


def test_anything_that_decides_the_rows_changes_the_key(converted, tokenizer, tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_bytes((converted / "mts" / "train.jsonl").read_bytes())
    base = TokenizeSettings(max_seq_len=256)
    key = cache_key([str(f)], tokenizer, base)
    assert cache_key([str(f)], tokenizer, base) == key
    for changed in (dataclasses.replace(base, max_seq_len=255),
                    dataclasses.replace(base, max_target_len=64),
                    dataclasses.replace(base, system_prompt="You are a doctor."),
                    dataclasses.replace(base, mcq_with_explanation=False)):
        assert cache_key([str(f)], tokenizer, changed) != key, changed
    templated = load_tokenizer(resolve_model_path(ModelCfg()))
    templated.chat_template = tokenizer.chat_template.replace("<|im_start|>", "<|im_start|> ")
    assert cache_key([str(f)], templated, base) != key
    f.write_bytes(f.read_bytes() + b"\n")  # one byte more, same records
    assert cache_key([str(f)], tokenizer, base) != key


def test_a_cache_is_reused_and_a_partial_one_is_rebuilt(converted, tokenizer, tmp_path, caplog):
    f = str(converted / "cmexam" / "test.jsonl")
    settings = TokenizeSettings(max_seq_len=256)
    with caplog.at_level("INFO", logger="sparsedoc.data.cache"):
        folder = tokenized_file(f, tokenizer, settings, 1, tmp_path)
        built = (folder / COMPLETE).stat().st_mtime_ns
        assert tokenized_file(f, tokenizer, settings, 1, tmp_path) == folder
    assert (folder / COMPLETE).stat().st_mtime_ns == built
    assert sum("tokenizing" in r.message for r in caplog.records) == 1
    (folder / COMPLETE).unlink()  # what a build killed before its last write leaves
    caplog.clear()
    with caplog.at_level("INFO"):
        assert tokenized_file(f, tokenizer, settings, 1, tmp_path) == folder
    assert (folder / COMPLETE).is_file()
    assert any("rebuilding" in r.message and "interrupted" in r.message for r in caplog.records)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([folder.name,
                                                                  folder.name + ".lock"])


BUILD = """
import logging, sys
logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
from sparsedoc.config import ModelCfg
from sparsedoc.data.cache import TokenizeSettings, tokenized_file
from sparsedoc.models.load import load_tokenizer, resolve_model_path
tok = load_tokenizer(resolve_model_path(ModelCfg()))
print(tokenized_file(sys.argv[1], tok, TokenizeSettings(max_seq_len=256), 1, sys.argv[2]))
"""


def test_two_processes_started_together_build_the_cache_once(converted, tmp_path):
    script = tmp_path / "build.py"
    script.write_text(BUILD)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, str(script), str(converted / "cmexam" / "validation.jsonl"),
            str(tmp_path / "cache")]
    procs = [subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    folders = {o[0].strip().splitlines()[-1] for o in outs}
    assert len(folders) == 1
    logs = "".join(o[1] for o in outs)
    assert logs.count("tokenizing") == 1, logs[-3000:]
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == [
        Path(folders.pop()).name]
