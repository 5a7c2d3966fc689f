"""The ``prepare`` front door over every dataset: schema round trip, reports, cards, licenses,
the module CLIs, and the ``--hf`` path (with ``datasets.load_dataset`` faked: no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sparsedoc.prep import cli, cmb, cmexam, cmmlu_med, pubmedqa
from sparsedoc.prep.registry import REGISTRY, get_info
from sparsedoc.data.schema import read_jsonl, record_kind

REPO = Path(__file__).resolve().parents[1]

# registry name -> sample folder, and the output files each must produce
SAMPLES = {
    "cmexam": ("cmexam", {"validation", "test"}),
    "cmmlu_med": ("cmmlu_med", {"dev", "test"}),
    "cmb": ("cmb", {"test"}),
    "pubmedqa": ("pubmedqa", {"train", "validation"}),
    "medqa": ("medqa_usmle", {"test"}),
    "mts_dialog": ("mts_dialog", {"train", "validation"}),
    "aci_bench": ("aci_bench", {"train", "validation"}),
    "sumpubmed": ("sumpubmed", {"train", "validation", "test"}),
    "toyhom": ("chinese_medical_dialogue", {"train", "validation", "test"}),
    "bentsao": ("bentsao_huatuo_llama_med", {"train", "validation", "test"}),
}
NON_COMMERCIAL = {"cmexam", "cmmlu_med", "sumpubmed", "bentsao"}


@pytest.fixture(scope="module")
def prepared(shared_data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("prepared")
    for name, (folder, _) in SAMPLES.items():
        rc = cli.main(["prepare", name, "--src", str(shared_data / folder), "--out",
                       str(root / name)])
        assert rc == 0, name
    return {name: root / name for name in SAMPLES}


@pytest.mark.parametrize("name", list(SAMPLES))
def test_round_trip_through_the_schema(prepared, name):
    out = prepared[name]
    splits = SAMPLES[name][1]
    assert {p.stem for p in out.glob("*.jsonl")} == splits
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    for split in splits:
        path = out / f"{split}.jsonl"
        records = read_jsonl(path)  # validates every record, rejects duplicate ids
        assert len(records) == report["splits"][split]["out"] == report["outputs"][split]["records"]
        lines = path.read_text(encoding="utf-8").splitlines()  # no stray U+2028/2029 breaks
        assert [json.dumps(r, ensure_ascii=False) for r in records] == lines  # stable round trip
        for r in records:
            assert r["id"].startswith(f"{r['meta']['source']}-{split}-")
            assert r["meta"]["lang"] in ("zh", "en")
            if record_kind(r) == "chat":
                assert r["meta"]["task"] and r["messages"][-1]["role"] == "assistant"
                assert all(m["content"].strip() == m["content"] != "" for m in r["messages"])
                assert "\r" not in "".join(m["content"] for m in r["messages"])
            else:
                assert r["meta"]["subject"] and r["answer"] == "".join(sorted(set(r["answer"])))
    assert report["seconds"] < 30


@pytest.mark.parametrize("name", list(SAMPLES))
def test_dataset_card(prepared, name):
    card = (prepared[name] / "README.md").read_text(encoding="utf-8")
    report = json.loads((prepared[name] / "report.json").read_text(encoding="utf-8"))
    assert card.startswith(f"# {report['title']}")
    assert f"- license: {report['license']}" in card
    assert ("**NON-COMMERCIAL**" in card) == (get_info(name).name in NON_COMMERCIAL)
    for split, s in report["splits"].items():
        assert f"| {split} | {s['in']} | {s['out']} | {s['skipped']} | `{split}.jsonl` |" in card
    assert "Example (`" in card and "```text" in card
    manifest = json.loads((prepared[name] / "manifest.json").read_text(encoding="utf-8"))
    assert manifest["kind"] == "conversion" and manifest["inputs"]


def test_card_renders_an_mcq(prepared):
    card = (prepared["cmexam"] / "README.md").read_text(encoding="utf-8")
    assert "上消化道出血可单纯表现为呕血或黑便" in card and "\nE. 以上均非\n\nanswer: C" in card


def test_prepare_list_flags_non_commercial(capsys):
    assert cli.main(["prepare", "list"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == set(REGISTRY)
    assert {n for n, line in rows.items() if "  yes  " in line} == NON_COMMERCIAL
    assert {n for n, i in REGISTRY.items() if i.non_commercial} == NON_COMMERCIAL


def test_unknown_dataset_and_usage(capsys):
    assert cli.main(["prepare", "medmcqa", "--src", "x", "--out", "y"]) == 2
    assert "unknown dataset 'medmcqa'; known: aci_bench" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_module_entry_points(shared_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, "-m", "sparsedoc.prep.mts_dialog", "--src",
                          str(shared_data / "mts_dialog"), "--out", str(tmp_path / "mts")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "train      in   1201  out   1201  skipped 0" in run.stdout
    run = subprocess.run([sys.executable, "-m", "data_prep", "prepare", "list"], cwd=REPO,
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "chinese_medical_dialogue" in run.stdout


# ----------------------------------------------------------------------- --hf, without network

class FakeHub:
    """Stands in for ``datasets.load_dataset``: (id, config) -> {split: [rows]}."""

    def __init__(self, data: dict[tuple[str, str | None], dict[str, list[dict]]]):
        self.data, self.calls = data, []

    def __call__(self, hf_id: str, config: str | None = None):
        from datasets import Dataset, DatasetDict

        self.calls.append((hf_id, config))
        if (hf_id, config) not in self.data:
            raise FileNotFoundError(f"Couldn't find '{hf_id}' on the Hugging Face Hub")
        return DatasetDict({k: Dataset.from_list(v) for k, v in self.data[(hf_id, config)].items()})


def test_hf_cmmlu(monkeypatch, tmp_path):
    row = {"Question": "女性生殖腺是", "A": "卵巢", "B": "前庭大腺", "C": "前庭球", "D": "乳腺",
           "Answer": "A"}
    hub = FakeHub({("haonan-li/cmmlu", s): {"dev": [row], "test": [row, {**row, "Answer": "B"}]}
                   for s in cmmlu_med.MEDICAL_SUBJECTS})
    monkeypatch.setattr("datasets.load_dataset", hub)
    report = cmmlu_med.convert(None, tmp_path, hf="haonan-li/cmmlu")
    assert len(hub.calls) == 9  # every medical subject, including college_medical_statistics
    assert (report["splits"]["dev"]["out"], report["splits"]["test"]["out"]) == (9, 18)
    test = read_jsonl(tmp_path / "test.jsonl")
    assert test[0]["id"] == "cmmlu_med-test-anatomy-0" and test[1]["answer"] == "B"
    assert report["hf"] == "haonan-li/cmmlu" and report["src"] is None
    assert "Hugging Face hub `haonan-li/cmmlu`" in (tmp_path / "README.md").read_text()


def test_hf_pubmedqa_with_test_labels(monkeypatch, tmp_path):
    def item(pmid: int, label: str) -> dict:
        return {"pubid": pmid, "question": f"Q{pmid}?", "long_answer": "Because.",
                "final_decision": label, "context": {"contexts": ["c1", "c2"],
                                                     "labels": ["BACKGROUND", "RESULTS"],
                                                     "meshes": ["Humans"]}}
    hub = FakeHub({("qiaojin/PubMedQA", "pqa_labeled"): {
        "train": [item(i, ("yes", "no", "maybe")[i % 3]) for i in range(1, 31)]}})
    monkeypatch.setattr("datasets.load_dataset", hub)
    (tmp_path / "gt.json").write_text(json.dumps({"1": "no", "2": "maybe", "3": "yes"}))
    report = pubmedqa.convert(None, tmp_path / "out", hf="qiaojin/PubMedQA",
                              test_labels=tmp_path / "gt.json")
    assert report["splits"]["test"]["out"] == 3
    assert sum(s["out"] for s in report["splits"].values()) == 30
    rec = read_jsonl(tmp_path / "out" / "test.jsonl")[0]
    assert rec["messages"][0]["content"].startswith("BACKGROUND: c1\nRESULTS: c2\n\nQuestion: Q1?")
    assert rec["messages"][1]["content"] == "Answer: no\nBecause."


def test_hf_cmb_clin_solution_key_and_errors(monkeypatch, tmp_path):
    case = {"id": 0, "title": "案例分析-腹外疝", "description": "病人，男，49岁。",
            "QA_pairs": [{"question": "诊断？", "solution": "腹股沟斜疝。"}]}
    monkeypatch.setattr("datasets.load_dataset",
                        FakeHub({("FreedomIntelligence/CMB", "clin"): {"test": [case]}}))
    report = cmb.convert(None, tmp_path / "out", hf="FreedomIntelligence/CMB", part="clin")
    assert report["source"] == "cmb_clin" and report["splits"]["test"]["out"] == 1
    with pytest.raises(cmb.ConvertError, match="choose the part"):
        cmb.convert(None, tmp_path / "x", hf="FreedomIntelligence/CMB")
    with pytest.raises(cmb.ConvertError, match=r"could not load FreedomIntelligence/CMB \(config "
                                               r"'exam'\) from the Hugging Face hub"):
        cmb.convert(None, tmp_path / "y", hf="FreedomIntelligence/CMB", part="exam")


# one or two hub rows per converter, in the column layout its files use
HUB_ROWS = {
    "cmexam": ("fzkuji/CMExam", None, {"train": [
        {"Question": "夜间阵发性呼吸困难，可见于", "Answer": "E", "Explanation": "",
         "Options": [{"key": k, "value": v} for k, v in zip("ABCDE", "甲乙丙丁戊")]}]}),
    "medqa": ("GBaker/MedQA-USMLE-4-options", None, {"test": [
        {"question": "Which?", "answer": "y", "options": {"A": "x", "B": "y", "C": "z", "D": "w"},
         "meta_info": "step1", "answer_idx": "B"}]}),
    "mts_dialog": ("someone/mts", None, {"train": [
        {"ID": 0, "section_header": "cc", "section_text": "Pain.", "dialogue": "Doctor: hi"}]}),
    "aci_bench": ("someone/aci", None, {"test": [
        {"src": "[doctor] hi", "tgt": "CHIEF COMPLAINT\n\nPain.", "file": "D2N088-aci"}]}),
    "toyhom": ("someone/toyhom", None, {"train": [
        {"department": "内科", "title": "头痛", "question": "头痛怎么办", "answer": "休息"}]}),
    "bentsao": ("someone/bentsao", None, {"train": [
        {"instruction": "问题", "input": "", "output": "回答"}]}),
    "sumpubmed": ("someone/sumpubmed", None, {"train": [
        {"id": 7, "text": "BACKGROUND\nan article", "abstract": "the abstract",
         "shorter_abstract": "short"}]}),
}


@pytest.mark.parametrize("name", list(HUB_ROWS))
def test_hf_path_of_each_converter(monkeypatch, tmp_path, name):
    hf_id, config, splits = HUB_ROWS[name]
    monkeypatch.setattr("datasets.load_dataset", FakeHub({(hf_id, config): splits}))
    rc = cli.main(["prepare", name, "--hf", hf_id, "--out", str(tmp_path)])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text(encoding="utf-8"))
    assert report["totals"] == {"in": 1, "out": 1, "skipped": 0} and report["hf"] == hf_id
    (path,) = tmp_path.glob("*.jsonl")
    assert len(read_jsonl(path)) == 1


def test_overlap_between_official_splits_is_reported(tmp_path):
    header = "Question,Options,Answer,Explanation\r\n"
    rows = ['Q1,"A a\nB b",A,e\r\n', 'Q2,"A a\nB b",B,e\r\n']
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "val.csv").write_text(header + rows[0] + rows[1], encoding="utf-8")
    (tmp_path / "src" / "test.csv").write_text(header + rows[1], encoding="utf-8")
    report = cmexam.convert(tmp_path / "src", tmp_path / "out")
    assert report["splits"]["test"]["overlap"] == {"validation": 1}
    assert "**Records shared between splits**: {'test': {'validation': 1}}" in \
        (tmp_path / "out" / "README.md").read_text(encoding="utf-8")


def test_reconverting_into_a_folder_removes_splits_no_longer_produced(tmp_path):
    header = "Question,Options,Answer,Explanation\r\n"
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "val.csv").write_text(header + 'Q1,"A a\nB b",A,e\r\n', encoding="utf-8")
    (tmp_path / "src" / "test.csv").write_text(header + 'Q2,"A a\nB b",B,e\r\n', encoding="utf-8")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.jsonl").write_text("{}\n", encoding="utf-8")  # not ours: kept
    cmexam.convert(tmp_path / "src", tmp_path / "out")
    (tmp_path / "src" / "test.csv").unlink()
    cmexam.convert(tmp_path / "src", tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.jsonl")) == ["keep.jsonl",
                                                                          "validation.jsonl"]
