"""The token-length report (`sparsedoc lengths`) on the shared ACI-Bench and MTS-Dialog samples,
checked against a direct count with the tokenizer; and the records that target-preserving
truncation saves really keep their whole note."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sparsedoc.config import ModelCfg
from sparsedoc.data.schema import read_jsonl
from sparsedoc.data.tokenize import IGNORE_INDEX, tokenize_records
from sparsedoc.models.load import load_tokenizer, resolve_model_path

SEQ_LENS = [2048, 4096]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(resolve_model_path(ModelCfg()))


@pytest.fixture(scope="module")
def converted(shared_data, tmp_path_factory):
    from sparsedoc.prep import aci_bench, mts_dialog

    root = tmp_path_factory.mktemp("medigen")
    aci_bench.convert(shared_data / "aci_bench", root / "aci_bench")
    mts_dialog.convert(shared_data / "mts_dialog", root / "mts_dialog")
    return {f"{name}/{split}": root / name / f"{split}.jsonl"
            for name in ("aci_bench", "mts_dialog") for split in ("train", "validation")}


def direct(tok, record):
    """(total, target) tokens counted straight from the template text, as plain text."""
    text = tok.apply_chat_template(record["messages"], tokenize=False)
    total = len(tok(text, add_special_tokens=False)["input_ids"])
    note = record["messages"][-1]["content"]
    assert text.endswith(f"<|im_start|>assistant\n{note}<|im_end|>\n")  # SmolLM2's ChatML
    target = len(tok(note + "<|im_end|>\n", add_special_tokens=False)["input_ids"])
    return total, target


@pytest.fixture(scope="module")
def report(converted, tmp_path_factory):
    from sparsedoc.cli import main

    out = tmp_path_factory.mktemp("lengths") / "lengths.json"
    assert main(["lengths", *map(str, converted.values()), "--seq-lens",
                 ",".join(map(str, SEQ_LENS)), "--out", str(out)]) == 0
    return json.loads(out.read_text())["data"]


def test_length_report_matches_a_direct_token_count(tok, converted, report):
    assert set(report) == set(converted)
    for name, path in converted.items():
        records = read_jsonl(path)
        counts = [direct(tok, r) for r in records]
        totals = [n for n, _ in counts]
        targets = [t for _, t in counts]
        r = report[name]
        assert r["records"] == len(records)
        for p in (50, 90, 95, 99, 100):
            assert r["percentiles"]["total"][f"p{p}"] == int(
                np.percentile(totals, p, method="inverted_cdf")), (name, p)
            assert r["percentiles"]["target"][f"p{p}"] == int(
                np.percentile(targets, p, method="inverted_cdf")), (name, p)
        for L in SEQ_LENS:
            fit = sum(n <= L for n in totals)
            assert r[str(L)]["fit_whole"] == fit, (name, L)
            assert r[str(L)]["right_truncation_cuts_target"] == len(records) - fit
            # no note of the samples is near these lengths, so every record can keep its note
            assert max(targets) < L - 256
            assert r[str(L)]["target_preserving_keeps_target"] == len(records)
            assert r[str(L)]["saved"] == len(records) - fit
            assert r[str(L)]["shortened"] == len(records) - fit and not r[str(L)]["skipped"]
    # the point of the issue: most ACI-Bench encounters are longer than 2048 tokens
    aci = report["aci_bench/train"]["2048"]
    assert aci["fit_whole"] < aci["target_preserving_keeps_target"] / 2


def test_saved_aci_bench_records_keep_their_whole_note(tok, converted):
    records = read_jsonl(converted["aci_bench/validation"])
    long = [r for r in records if direct(tok, r)[0] > 2048]
    assert len(long) >= 5
    out, stats = tokenize_records(long, tok, max_seq_len=2048)
    assert len(out) == len(long) and stats.truncated == len(long) and stats.turns_cut == 0
    for rec, ex in zip(long, out):
        note = rec["messages"][-1]["content"]
        assert len(ex.input_ids) <= 2048
        assert [t for t in ex.labels if t != IGNORE_INDEX] == tok(
            note + "<|im_end|>\n", add_special_tokens=False)["input_ids"]
        # the encounter's opening and its closing turns are still there
        lines = rec["messages"][0]["content"].split("\n")
        text = tok.decode(ex.input_ids)
        assert lines[2] in text and lines[-3] in text
