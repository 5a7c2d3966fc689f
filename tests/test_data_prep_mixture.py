"""Mixtures of converted sets: weights give proportions, duplicates go, a manifest tells all."""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from pathlib import Path

import pytest
import yaml

from sparsedoc.prep import bentsao, chinese_medical_dialogue, cli, cmexam
from sparsedoc.prep.common import ConvertError
from sparsedoc.prep.mixture import MixtureConfig, allocate, build_mixture, load_manifest
from sparsedoc.data.schema import read_jsonl


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def norm(record: dict) -> str:
    text = "".join(m["content"] for m in record["messages"])
    return re.sub(r"\s+", "", unicodedata.normalize("NFKC", text).lower())


@pytest.fixture(scope="module")
def converted(shared_data, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("converted")
    chinese_medical_dialogue.convert(shared_data / "chinese_medical_dialogue", root / "toyhom")
    bentsao.convert(shared_data / "bentsao_huatuo_llama_med", root / "bentsao")
    cmexam.convert(shared_data / "cmexam", root / "cmexam")
    return root


def write_config(path: Path, root: Path, total: int | None = None, relative: bool = False,
                 **extra) -> Path:
    base = Path() if relative else root
    cfg = {"seed": 0, "sources": [
        {"path": str(base / "toyhom" / "train.jsonl"), "weight": 0.5},
        {"path": str(base / "bentsao" / "train.jsonl"), "weight": 0.3},
        {"path": str(base / "cmexam" / "validation.jsonl"), "weight": 0.2, "mcq_to_chat": True}],
        **extra}
    if total is not None:
        cfg["total"] = total
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return path


def test_mixture_with_total_has_exact_proportions_and_manifest(converted, tmp_path):
    config = write_config(tmp_path / "mix.yaml", converted, total=1000)
    assert cli.main(["prepare", "mixture", str(config), "--out", str(tmp_path / "mix")]) == 0
    mixed = read_jsonl(tmp_path / "mix" / "train.jsonl")  # validates, rejects duplicate ids
    assert Counter(r["meta"]["source"] for r in mixed) == {
        "chinese_medical_dialogue": 500, "bentsao": 300, "cmexam": 200}
    assert len({norm(r) for r in mixed}) == 1000  # no duplicate text left
    # MCQ records became instruction records: letters, then the explanation when there is one
    exam = [r for r in mixed if r["meta"]["source"] == "cmexam"]
    assert all(r["messages"][1]["content"].startswith("答案：") for r in exam)
    assert any("\n解析：" in r["messages"][1]["content"] for r in exam)

    manifest = load_manifest(tmp_path / "mix")
    assert manifest["kind"] == "mixture" and manifest["non_commercial"] is True  # cmexam, bentsao
    assert manifest["output"]["records"] == 1000
    assert manifest["output"]["sha256"] == sha256(tmp_path / "mix" / "train.jsonl")
    by_name = {Path(s["path"]).parent.name: s for s in manifest["sources"]}
    for name, rel in (("toyhom", "toyhom/train.jsonl"), ("bentsao", "bentsao/train.jsonl"),
                      ("cmexam", "cmexam/validation.jsonl")):
        assert by_name[name]["sha256"] == sha256(converted / rel)
    assert [by_name[n]["selected"] for n in ("toyhom", "bentsao", "cmexam")] == [500, 300, 200]
    assert by_name["cmexam"]["provenance"]["license"].startswith("Apache-2.0; README: academic")
    # duplicates inside the Toyhom training split, counted independently of the converter
    toyhom = read_jsonl(converted / "toyhom" / "train.jsonl")
    expected_dups = len(toyhom) - len({norm(r) for r in toyhom})
    assert expected_dups > 0
    assert by_name["toyhom"]["duplicates_within"] == expected_dups
    assert by_name["toyhom"]["available"] == len(toyhom) - expected_dups
    assert manifest["dedup"]["removed"] == expected_dups
    assert manifest["output"]["labels"]["(none)"] == 300  # bentsao has no label


def test_mixture_without_total_uses_weights_without_oversampling(converted, tmp_path):
    config = write_config(tmp_path / "mix.yaml", converted)
    manifest = build_mixture(MixtureConfig.from_yaml(config), tmp_path / "mix", config)
    avail = [s["available"] for s in manifest["sources"]]
    picked = [s["selected"] for s in manifest["sources"]]
    assert all(p <= a for p, a in zip(picked, avail)) and not any(
        s["repeats"] for s in manifest["sources"])
    # Toyhom is the binding source (available / weight is smallest): it is used in full
    assert picked[0] == avail[0]
    total = sum(picked)
    for p, w in zip(picked, (0.5, 0.3, 0.2)):
        assert abs(p - w * total) <= 1
    again = build_mixture(MixtureConfig.from_yaml(config), tmp_path / "again", config)
    assert again["output"]["sha256"] == manifest["output"]["sha256"]  # seeded


def test_mixture_oversamples_when_total_exceeds_data(converted, tmp_path):
    cfg = {"seed": 3, "total": 2000, "sources": [
        {"path": str(converted / "cmexam" / "test.jsonl"), "weight": 1, "mcq_to_chat": True},
        {"path": str(converted / "bentsao" / "test.jsonl"), "weight": 1}]}
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    manifest = build_mixture(MixtureConfig.from_yaml(tmp_path / "m.yaml"), tmp_path / "mix")
    exam = manifest["sources"][0]
    assert (exam["available"], exam["selected"], exam["repeats"]) == (49, 1000, 951)
    ids = [r["id"] for r in read_jsonl(tmp_path / "mix" / "train.jsonl")]
    assert len(ids) == 2000 and "cmexam-test-0#2" in ids


def test_relative_paths_resolve_against_the_config_folder(converted, tmp_path):
    config = write_config(converted / "mix_rel.yaml", converted, total=10, relative=True)
    manifest = build_mixture(MixtureConfig.from_yaml(config), tmp_path / "mix", config)
    assert [s["selected"] for s in manifest["sources"]] == [5, 3, 2]
    assert manifest["config_sha256"] == sha256(config)


@pytest.mark.parametrize("cfg,pattern", [
    ({"sources": [{"path": "x.jsonl", "weight": 1}], "seeds": 1}, r"unknown key\(s\) \['seeds'\]"),
    ({"sources": [{"path": "x.jsonl", "weight": 0}]}, r"'x\.jsonl': weight must be > 0"),
    ({"sources": [{"path": "x.jsonl", "weight": 1, "mcq": True}]},
     r"sources\[0\]: unknown key\(s\) \['mcq'\]"),
    ({"sources": [{"path": "x.jsonl"}]},
     r"sources\[0\]: expected \{path: \.\.\., weight: \.\.\.\}"),
    ({"sources": []}, r"'sources' is empty"),
    ({"sources": [{"path": "x.jsonl", "weight": 1}], "total": -5}, r"total must be a positive"),
])
def test_bad_mixture_configs(tmp_path, cfg, pattern):
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(cfg), encoding="utf-8")
    with pytest.raises(ConvertError, match=pattern):
        MixtureConfig.from_yaml(tmp_path / "m.yaml")


def test_missing_or_invalid_source_file(tmp_path):
    cfg = MixtureConfig.from_yaml(_dump(tmp_path / "m.yaml", {"sources": [
        {"path": str(tmp_path / "nope.jsonl"), "weight": 1}]}))
    with pytest.raises(ConvertError, match=r"nope\.jsonl'?: no such file"):
        build_mixture(cfg, tmp_path / "out")
    (tmp_path / "bad.jsonl").write_text('{"id": "a", "messages": []}\n', encoding="utf-8")
    cfg = MixtureConfig.from_yaml(_dump(tmp_path / "m.yaml", {"sources": [
        {"path": str(tmp_path / "bad.jsonl"), "weight": 1}]}))
    with pytest.raises(ConvertError, match=r"bad\.jsonl:1: field 'messages'"):
        build_mixture(cfg, tmp_path / "out")


def _dump(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_allocate():
    assert allocate([0.5, 0.3, 0.2], [10_000, 10_000, 10_000], 1001) == [501, 300, 200]
    assert allocate([1, 1, 1], [100, 100, 100], 10) == [4, 3, 3]
    assert allocate([0.5, 0.3, 0.2], [1000, 1000, 100], None) == [250, 150, 100]
    assert allocate([2, 1], [10, 1000], None) == [10, 5]


def test_load_manifest_kinds(converted, tmp_path):
    conv = load_manifest(converted / "cmexam")
    assert conv["kind"] == "conversion" and conv["non_commercial"] is True
    assert set(conv["outputs"]) == {"validation", "test"}
    assert conv["outputs"]["test"]["sha256"] == sha256(converted / "cmexam" / "test.jsonl")
    (tmp_path / "manifest.json").write_text(json.dumps({"hello": 1}), encoding="utf-8")
    with pytest.raises(ConvertError, match="not a data manifest"):
        load_manifest(tmp_path)
    with pytest.raises(ConvertError, match="cannot read the manifest"):
        load_manifest(tmp_path / "missing.json")
