"""The shipped demo dataset (data_prep/demo) is intact: valid, split by fact, exactly counted,
consistent with facts.py, and byte-for-byte reproducible by its builder."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from sparsedoc.prep.demo import build
from sparsedoc.prep.demo.facts import DEPARTMENTS, FACTS
from sparsedoc.data.schema import read_jsonl, record_kind, record_label, validate_record

DEMO = Path(build.__file__).resolve().parent
EXPECTED_DEPARTMENTS = ("cardiology", "endocrinology", "respiratory", "gastroenterology",
                        "neurology", "infectious_disease", "pediatrics", "dermatology")
# 15 facts per department: 13 in train, 2 held out; each fact gives one record per lang x kind.
FACTS_PER_SPLIT = {"train": 13, "eval": 2}
RECORDS_PER_SPLIT = {"train": 416, "eval": 64}
ID_RE = re.compile(r"^demo-([a-z_]+)-(\d{2})-(en|zh)-(qa|mcq)$")


@pytest.fixture(scope="module")
def splits() -> dict[str, list[dict]]:
    return {name: read_jsonl(DEMO / f"{name}.jsonl") for name in build.SPLITS}


def parse_id(record: dict) -> tuple[str, int, str, str]:
    m = ID_RE.match(record["id"])
    assert m, f"malformed id {record['id']!r}"
    return m.group(1), int(m.group(2)), m.group(3), m.group(4)


def questions(records: list[dict]) -> set[str]:
    return {r["messages"][0]["content"] if record_kind(r) == "chat" else r["question"]
            for r in records}


def test_facts_cover_eight_departments_with_well_formed_items():
    assert DEPARTMENTS == EXPECTED_DEPARTMENTS
    seen: set[str] = set()
    for dept, facts in FACTS.items():
        assert len(facts) == 15, dept
        for i, fact in enumerate(facts, start=1):
            for lang in ("en", "zh"):
                side = getattr(fact, lang)
                texts = (side.q, side.a, side.stem)
                assert all(isinstance(t, str) and t.strip() for t in texts), (dept, i)
                options = [side.right, *side.wrong]
                assert len(side.wrong) == 3 and len(set(options)) == 4, (dept, i, lang)
                for text in (side.q, side.stem):
                    assert text not in seen, f"question reused: {text!r}"
                    seen.add(text)
            # Short answers keep every rendered record under 256 tokens.
            assert len(fact.en.a.split()) <= 60, (dept, i)
            assert len(fact.zh.a) <= 80, (dept, i)
            assert re.search(r"[\u4e00-\u9fff]", fact.zh.q + fact.zh.a), (dept, i)


def test_every_record_validates(splits):
    for records in splits.values():
        for r in records:
            validate_record(r, r["id"])
            assert r["meta"]["source"] == "sparsedoc-demo"
            assert record_label(r) == r["meta"]["label"] in DEPARTMENTS
            if record_kind(r) == "mcq":
                assert r["meta"]["subject"] == r["meta"]["label"]
            else:
                assert r["meta"]["task"] == "qa"
                assert [m["role"] for m in r["messages"]] == ["user", "assistant"]


def test_ids_are_unique_and_match_the_record(splits):
    ids = [r["id"] for records in splits.values() for r in records]
    assert len(ids) == len(set(ids)) == 480
    for records in splits.values():
        for r in records:
            dept, _, lang, kind = parse_id(r)
            assert (dept, lang) == (r["meta"]["label"], r["meta"]["lang"])
            assert record_kind(r) == ("chat" if kind == "qa" else "mcq")


@pytest.mark.parametrize("split", build.SPLITS)
def test_exact_counts_per_department_language_and_kind(splits, split):
    records = splits[split]
    assert len(records) == RECORDS_PER_SPLIT[split]
    counts = Counter((dept, lang, kind) for dept, _, lang, kind in map(parse_id, records))
    expected = {(d, lang, kind): FACTS_PER_SPLIT[split]
                for d in EXPECTED_DEPARTMENTS for lang in ("en", "zh") for kind in ("qa", "mcq")}
    assert dict(counts) == expected


def test_no_fact_is_in_both_splits(splits):
    facts = {name: Counter(parse_id(r)[:2] for r in recs) for name, recs in splits.items()}
    assert not set(facts["train"]) & set(facts["eval"])
    assert all(n == 4 for c in facts.values() for n in c.values())  # all four renderings together
    assert not questions(splits["train"]) & questions(splits["eval"])


def test_records_carry_the_text_of_their_fact(splits):
    answers = Counter()
    for records in splits.values():
        for r in records:
            dept, number, lang, kind = parse_id(r)
            side = getattr(FACTS[dept][number - 1], lang)
            if kind == "qa":
                assert [m["content"] for m in r["messages"]] == [side.q, side.a]
                continue
            assert r["question"] == side.stem and r["explanation"] == side.a
            assert list(r["options"]) == ["A", "B", "C", "D"]
            assert r["options"][r["answer"]] == side.right
            assert sorted(r["options"].values()) == sorted([side.right, *side.wrong])
            answers[r["answer"]] += 1
    assert answers == {"A": 60, "B": 60, "C": 60, "D": 60}  # no letter bias to exploit


def test_builder_is_deterministic(tmp_path, capsys):
    build.main(["--out", str(tmp_path)])
    assert "records: train=416, eval=64" in capsys.readouterr().out
    for name in build.SPLITS:
        shipped = (DEMO / f"{name}.jsonl").read_bytes()
        assert (tmp_path / f"{name}.jsonl").read_bytes() == shipped, (
            f"{name}.jsonl is stale: run `python -m sparsedoc.prep.demo.build`")
