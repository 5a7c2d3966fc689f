"""The fault-handling pieces on their own, fast: the stop-signal handler (real signals), the
fault grammar, non-finite component naming, the resume check's refusals, the telemetry state
and the bounded, crash-safe checkpoint rotation. The launcher tests inflict the faults end to
end (tests/test_faults_launcher.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sparsedoc.checkpoint import _rotate, list_checkpoints, read_rank_state
from sparsedoc.moe.telemetry import RoutingStats
from sparsedoc.train.faults import (StopSignals, agree_on_micro_batch, nonfinite_terms,
                                    parse_faults)
from sparsedoc.train.resume_check import ResumeMismatch, check_resume, config_hash

REPO = Path(__file__).resolve().parents[1]


def test_first_signal_asks_to_stop_and_the_same_notice_is_not_a_second_one():
    stop = StopSignals(same_notice_s=5.0).install()
    try:
        assert not stop.requested and stop.agreed() == {}
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C and the launcher's SIGTERM together
        time.sleep(0.05)
        assert stop.requested and stop.agreed() == {0: "SIGTERM"}  # still alive
    finally:
        stop.restore()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_second_signal_aborts_at_once():
    code = ("import os, signal, time\n"
            "from sparsedoc.train.faults import StopSignals\n"
            "StopSignals(same_notice_s=0.1).install()\n"
            "os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.3)\n"
            "os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
            "print('still running')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert "still running" not in proc.stdout
    assert "second SIGINT: aborting now" in proc.stderr


def test_fault_grammar():
    nan, kill, slow = parse_faults("nan@2,4-5:rank=1:module=model.layers.0;kill@5:at=save;"
                                   "slow@*:s=0.2")
    assert nan.steps == {2, 4, 5} and nan.rank == 1 and nan.options == {"module": "model.layers.0"}
    assert nan.hits(4, 1) and not nan.hits(4, 0) and not nan.hits(3, 1)
    assert kill.steps == {5} and kill.rank is None and kill.options["at"] == "save"
    assert slow.steps is None and slow.hits(123, 0)
    with pytest.raises(ValueError, match="unknown fault"):
        parse_faults("boom@1")


def test_nonfinite_components_are_named():
    terms = {"lm": "train/lm_loss", "balance": "moe/balance_loss"}
    nan, one = torch.tensor(float("nan")), torch.tensor(1.0)
    assert nonfinite_terms(one, {"train/lm_loss": 1.0, "moe/balance_loss": 0.1}, terms) == []
    assert nonfinite_terms(nan, {"train/lm_loss": 1.0, "moe/balance_loss": float("inf")},
                           terms) == ["balance"]
    assert nonfinite_terms(nan, {}, terms) == ["total"]
    verdict = agree_on_micro_batch(["balance"], "layers.1.q", ["lm", "balance"],
                                   ["layers.0.q", "layers.1.q"])
    assert (verdict.ranks, verdict.terms, verdict.layer) == ([0], ["balance"], "layers.1.q")
    assert agree_on_micro_batch([], None, ["lm"], []) is None


SAVED = {"step": 4, "world_size": 2, "micro_batch_size": 4, "grad_accum": 1, "data_hash": "aa",
         "config_hash": "c1"}


def test_resume_refuses_a_changed_world_size_or_data_and_names_it(tmp_path):
    now = {**SAVED, "world_size": 1}
    with pytest.raises(ResumeMismatch, match=r"world size 2 -> 1.*resume_allow_changes=true"):
        check_resume(SAVED, now, False, tmp_path, 2, None, {})
    with pytest.raises(ResumeMismatch, match=r"training data \(files and data\.\*\) aa -> bb"):
        check_resume(SAVED, {**SAVED, "data_hash": "bb"}, False, tmp_path, 2, None, {})
    with pytest.raises(ResumeMismatch, match="ZeRO-3"):  # not even with the override
        check_resume(SAVED, now, True, tmp_path, 3, None, {})
    plan = check_resume(SAVED, now, True, tmp_path, 2, None, {})
    assert not plan.load_optimizer and plan.samples_per_batch_saved == 8
    same = check_resume(SAVED, dict(SAVED), False, tmp_path, 2, None, {})
    assert same.changes == [] and same.load_optimizer and not same.samples_per_batch_saved


def test_config_hash_ignores_what_may_change_between_legs():
    from sparsedoc.config import Config, config_to_dict

    base = config_to_dict(Config())
    legs = json.loads(json.dumps(base))
    legs["train"].update(resume_from="auto", stop_at=3, keep_last=5, output_dir="elsewhere")
    legs["logging"]["wandb"] = False
    assert config_hash(legs) == config_hash(base)
    legs["train"]["lr"] = 1.0
    assert config_hash(legs) != config_hash(base)


def test_routing_telemetry_round_trips_and_a_skipped_micro_batch_leaves_no_trace():
    stats = RoutingStats(["a", "b"], 4, [0, 1], collapse_threshold=0.3, collapse_patience=2)
    idx, probs = torch.tensor([[0, 1], [0, 2]]), torch.full((2, 4), 0.25)
    mask = torch.ones(2)
    stats.add(0, idx, probs, mask)
    stats.flush(lambda xs: xs)
    stats.flush(lambda xs: xs)  # an empty window leaves the count alone
    stats.add(1, idx, probs, mask)
    stats.mark()
    stats.add(1, idx, probs * float("nan"), mask)
    stats.rollback()
    assert torch.isfinite(stats.entropy_sum).all() and stats.tokens.tolist() == [0.0, 2.0]
    stats.flush(lambda xs: xs)
    state = json.loads(json.dumps(stats.state_dict()))
    again = RoutingStats(["a", "b"], 4, [0, 1], 0.3, 2)
    again.load_state_dict(state)
    assert again.collapsed_for == stats.collapsed_for == 2
    assert again.state_dict() == stats.state_dict()
    with pytest.raises(ValueError, match="other routing layers"):
        RoutingStats(["x"], 4, [0], 0.3, 2).load_state_dict(state)


def _ckpt(root: Path, step: int, complete: bool = True) -> Path:
    d = root / "checkpoints" / f"step-{step:06d}"
    d.mkdir(parents=True)
    if complete:
        (d / "trainer_state.json").write_text(json.dumps({"step": step}))
    return d


def test_keep_last_deletes_only_the_oldest_complete_checkpoints(tmp_path):
    for step in (2, 4, 6):
        _ckpt(tmp_path, step)
    _rotate(tmp_path, 2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == \
        ["step-000004", "step-000006"]  # no deleting-* folder left behind
    _rotate(tmp_path, 0)  # 0 keeps all
    assert len(list_checkpoints(tmp_path)) == 2


def test_rank_state_falls_back_to_rank_0_after_a_change_of_world_size(tmp_path):
    d = _ckpt(tmp_path, 2)
    (d / "method_state_rank0.json").write_text(json.dumps({"x": 1}))
    assert read_rank_state(d, 0) == {"x": 1}
    assert read_rank_state(d, 3) == {"x": 1, "from_rank": 0}
    assert read_rank_state(_ckpt(tmp_path, 4), 0) is None
