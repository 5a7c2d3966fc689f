"""The caches sparsedoc writes stay sound under concurrent processes: the embedded-model folder
(sparsedoc.cachedir.build_once via models.load) and the evaluation's prediction cache."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sparsedoc.cachedir import build_once
from sparsedoc.config import ModelCfg
from sparsedoc.eval.cache import PredictionCache

# Fresh interpreters, as separate ranks would be. They import this module, so sparsedoc.models.load
# (torch, transformers) is imported inside the model tests only: the fast children start quickly.
SPAWN = mp.get_context("spawn")
EMBEDDED_DIRNAME = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def converted() -> Path:
    """The user-level conversion the other tests share (converted once per machine)."""
    from sparsedoc.models.load import resolve_model_path

    return Path(resolve_model_path(ModelCfg()))


def _check_data(folder: Path) -> str | None:
    return None if (folder / "data.txt").is_file() else "no data.txt"


def _build_slowly(marker: Path, folder: Path) -> None:
    with marker.open("a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(0.5)  # long enough that every other process arrives while this one builds
    (folder / "data.txt").write_text("built")


def _build_once_child(target: str, marker: str, barrier) -> None:
    from functools import partial

    barrier.wait()
    build_once(Path(target), partial(_build_slowly, Path(marker)), _check_data, "test data")


def _run_together(fn, args_per_child: list[tuple], timeout: float) -> None:
    barrier = SPAWN.Barrier(len(args_per_child))
    procs = [SPAWN.Process(target=fn, args=(*a, barrier)) for a in args_per_child]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    assert [p.exitcode for p in procs] == [0] * len(procs)


# ---- build_once ------------------------------------------------------------------------------
def test_concurrent_processes_build_once_and_all_see_the_result(tmp_path):
    target, marker = tmp_path / "cache" / "thing", tmp_path / "builds.txt"
    _run_together(_build_once_child, [(str(target), str(marker))] * 3, timeout=60)
    assert len(marker.read_text().splitlines()) == 1
    assert (target / "data.txt").read_text() == "built"
    assert sorted(p.name for p in target.parent.iterdir()) == ["thing", "thing.lock"]
    assert (target.stat().st_mode & 0o777) == 0o755


def test_a_failing_build_leaves_neither_target_nor_temp_folder(tmp_path):
    def build(folder: Path) -> None:
        (folder / "half.txt").write_text("x")
        raise OSError("disk full")

    target = tmp_path / "thing"
    with pytest.raises(OSError, match="disk full"):
        build_once(target, build, _check_data, "test data")
    assert [p.name for p in tmp_path.iterdir()] == ["thing.lock"]


def test_a_fresh_build_failing_its_check_raises_with_the_reason(tmp_path):
    target = tmp_path / "thing"
    with pytest.raises(RuntimeError, match=r"thing gave an incomplete folder: no data\.txt"):
        build_once(target, lambda folder: None, _check_data, "test data")
    assert [p.name for p in tmp_path.iterdir()] == ["thing.lock"]


def test_a_broken_folder_is_rebuilt_with_a_warning(tmp_path, caplog):
    target = tmp_path / "thing"
    target.mkdir()
    (target / "junk.txt").write_text("left by a crash")
    with caplog.at_level(logging.WARNING, logger="sparsedoc"):
        build_once(target, lambda f: (f / "data.txt").write_text("new"), _check_data, "test data")
    assert sorted(p.name for p in target.iterdir()) == ["data.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name != "thing.lock"] == ["thing"]
    assert any(r.levelno == logging.WARNING and str(target) in r.getMessage()
               and "no data.txt" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
def test_waits_for_a_holder_and_a_dead_holders_lock_file_does_not_block(tmp_path, caplog):
    target = tmp_path / "thing"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from filelock import FileLock; "
         "lock = FileLock(sys.argv[1]); lock.acquire(); print('locked', flush=True); time.sleep(120)",
         f"{target}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with caplog.at_level(logging.INFO, logger="sparsedoc"):
            worker = threading.Thread(target=build_once, args=(
                target, lambda f: (f / "data.txt").write_text("x"), _check_data, "test data"))
            worker.start()
            while not any("waiting for another process to finish building test data"
                          in r.getMessage() for r in caplog.records):
                time.sleep(0.1)
            time.sleep(0.5)
            assert worker.is_alive() and not target.exists()  # blocked behind the holder
            holder.kill()  # dies holding the lock: its lock file stays behind, unlocked
            worker.join(30)
    finally:
        holder.kill()
        holder.wait()
    assert not worker.is_alive() and (target / "data.txt").is_file()
    assert (tmp_path / "thing.lock").is_file()


# ---- the embedded model ------------------------------------------------------------------------
class _Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _resolve_and_hash_child(cache_dir: str, out: str, rank: int, world: int, store: str,
                            barrier) -> None:
    """One rank of a real gloo process group, as under the deepspeed launcher: transformers
    writes checkpoints only on global rank 0 once torch.distributed is initialised, which is
    what broke the first multi-rank run. Rank 0 arrives last, so a rank > 0 converts."""
    import hashlib

    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from sparsedoc.models.load import resolve_model_path

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    recorder = _Recorder()
    logging.getLogger("sparsedoc").addHandler(recorder)
    logging.getLogger("sparsedoc").setLevel(logging.INFO)
    barrier.wait()
    if rank == 0:
        lock = Path(cache_dir) / (EMBEDDED_DIRNAME + ".lock")
        while not lock.exists():  # another rank holds the build
            time.sleep(0.05)
    path = resolve_model_path(ModelCfg(name_or_path="embedded", cache_dir=cache_dir))
    state = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode() + state[name].contiguous().numpy().tobytes())
    Path(out).write_text(json.dumps({"path": path, "sha256": digest.hexdigest(),
                                     "converted": sum(m.startswith("converting")
                                                      for m in recorder.messages)}))
    dist.barrier()
    dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_on_an_empty_cache_convert_once_and_load_the_same_weights(tmp_path):
    from sparsedoc.models.load import check_model_folder

    cache = tmp_path / "cache"
    outs = [tmp_path / f"rank{i}.json" for i in range(3)]
    store = tmp_path / "store"
    _run_together(_resolve_and_hash_child,
                  [(str(cache), str(o), i, 3, str(store)) for i, o in enumerate(outs)],
                  timeout=600)
    results = [json.loads(o.read_text()) for o in outs]
    assert {r["path"] for r in results} == {str(cache / EMBEDDED_DIRNAME)}
    assert len({r["sha256"] for r in results}) == 1
    assert sum(r["converted"] for r in results) == 1 and results[0]["converted"] == 0
    assert check_model_folder(cache / EMBEDDED_DIRNAME) is None
    assert sorted(p.name for p in cache.iterdir()) == [EMBEDDED_DIRNAME, EMBEDDED_DIRNAME + ".lock"]


def _plant(converted: Path, cache: Path, keep) -> Path:
    folder = cache / EMBEDDED_DIRNAME
    folder.mkdir(parents=True)
    for f in converted.iterdir():
        if keep(f.name):
            shutil.copy2(f, folder / f.name)
    return folder


def _rebuild_warning(caplog, folder: Path) -> str:
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                and r.name.startswith("sparsedoc")]
    assert len(warnings) == 1 and str(folder) in warnings[0], warnings
    return warnings[0]


@pytest.mark.slow  # converts the GGUF
def test_a_truncated_weights_file_is_rebuilt(converted, tmp_path, caplog):
    """One rebuild end to end (a conversion takes ~40 s); every other defect that triggers a
    rebuild is named by ``check_model_folder``, tested below without converting."""
    from sparsedoc.models.load import check_model_folder, resolve_model_path

    folder = _plant(converted, tmp_path, lambda n: True)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with caplog.at_level(logging.INFO, logger="sparsedoc"):
        resolve_model_path(ModelCfg(cache_dir=str(tmp_path)))
    assert "weights unreadable: model.safetensors" in _rebuild_warning(caplog, folder)
    assert weights.stat().st_size == (converted / "model.safetensors").stat().st_size
    assert check_model_folder(folder) is None


def test_a_complete_folder_is_reused_as_is(converted, tmp_path, caplog):
    from sparsedoc.models.load import resolve_model_path

    folder = _plant(converted, tmp_path, lambda n: True)
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}
    with caplog.at_level(logging.INFO, logger="sparsedoc"):
        for _ in range(2):
            assert resolve_model_path(ModelCfg(cache_dir=str(tmp_path))) == str(folder)
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()} == before
    assert not [r for r in caplog.records if r.name.startswith("sparsedoc")]


def test_check_names_what_makes_a_model_folder_incomplete(converted, tmp_path):
    from sparsedoc.models.load import check_model_folder

    assert check_model_folder(converted) is None
    tokenizer_only = _plant(converted, tmp_path / "a",
                            lambda n: n not in ("config.json", "model.safetensors"))
    assert check_model_folder(tokenizer_only) == "no config.json"

    folder = _plant(converted, tmp_path / "b", lambda n: True)
    (folder / "tokenizer.json").write_text("{")
    assert check_model_folder(folder).startswith("tokenizer does not load: ")
    shutil.copy2(converted / "tokenizer.json", folder / "tokenizer.json")
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    assert check_model_folder(folder).startswith("weights unreadable: model.safetensors: ")

    weights.unlink()  # now sharded: an index names the files and the tensors each holds
    shard = "model-00001-of-00002.safetensors"
    shutil.copy2(converted / "model.safetensors", folder / shard)
    index = folder / "model.safetensors.index.json"

    def write_index(weight_map: dict) -> None:
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))

    write_index({"model.norm.weight": shard})
    assert check_model_folder(folder) is None
    write_index({"model.norm.weight": shard, "extra.weight": shard})
    assert check_model_folder(folder) == f"weights incomplete: {shard} lacks ['extra.weight']"
    write_index({"model.norm.weight": shard, "lm_head.weight": "model-00002-of-00002.safetensors"})
    assert check_model_folder(folder) == "weights missing: model-00002-of-00002.safetensors"
    index.unlink()
    assert check_model_folder(folder) == "weights missing: model.safetensors"


# ---- the prediction cache ------------------------------------------------------------------------
def _append_one(path: str, done: str) -> None:
    cache = PredictionCache(path)
    Path(done + ".ready").write_text("about to add")
    cache.add([{"id": "child", "text": "x"}])
    cache.close()
    Path(done).write_text("added")


def test_a_prediction_cache_append_waits_for_the_lock_another_writer_holds(tmp_path):
    """Appends go through ``<file>.lock``: while another process holds it, an ``add`` waits.
    (On a local disk whole-line appends rarely interleave even without it; on network file
    systems they can, and this is the guarantee that does not depend on the disk.)"""
    from filelock import FileLock

    path, done = tmp_path / ".cache" / "task.scorer.key.jsonl", tmp_path / "done"
    first = PredictionCache(path)
    first.add([{"id": "parent", "text": "y"}])
    with FileLock(str(path) + ".lock"):
        child = SPAWN.Process(target=_append_one, args=(str(path), str(done)))
        child.start()
        ready = Path(str(done) + ".ready")
        deadline = time.monotonic() + 120
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), "the child never reached add()"
        time.sleep(2)  # add() would have written by now, were it not waiting
        assert child.is_alive() and not done.exists(), "add() wrote while the lock was held"
    child.join(60)
    assert child.exitcode == 0 and done.exists()
    first.close()
    assert set(PredictionCache(path).done) == {"parent", "child"}
