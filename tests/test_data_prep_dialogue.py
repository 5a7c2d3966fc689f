"""Dialogue, note, summarisation and SFT converters on the real samples: MTS-Dialog, ACI-Bench
(CSV and JSON forms), SumPubMed, Toyhom Chinese medical dialogues, BenTsao instructions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sparsedoc.prep import aci_bench, bentsao, chinese_medical_dialogue, mts_dialog, sumpubmed
from sparsedoc.data.schema import read_jsonl


def all_records(out: Path) -> dict[str, dict]:
    return {r["id"]: r for p in sorted(out.glob("*.jsonl")) for r in read_jsonl(p)}


def user_and_answer(record: dict) -> tuple[str, str]:
    return record["messages"][0]["content"], record["messages"][-1]["content"]


# --------------------------------------------------------------------------------- MTS-Dialog

MTS_TRAIN_LABELS = {
    "FAM/SOCHX": 351, "GENHX": 282, "PASTMEDICALHX": 118, "CC": 77, "PASTSURGICAL": 63,
    "ALLERGY": 60, "ROS": 60, "MEDICATIONS": 54, "ASSESSMENT": 34, "EXAM": 23, "DIAGNOSIS": 19,
    "DISPOSITION": 15, "PLAN": 11, "EDCOURSE": 8, "IMMUNIZATIONS": 8, "IMAGING": 6, "GYNHX": 5,
    "PROCEDURES": 3, "OTHER_HISTORY": 2, "LABS": 2}


@pytest.fixture(scope="module")
def mts_out(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("mts")
    return out, mts_dialog.convert(shared_data / "mts_dialog", out)


def test_mts_counts_and_labels(mts_out):
    _, report = mts_out
    assert {s: (v["in"], v["out"], v["skipped"]) for s, v in report["splits"].items()} == {
        "train": (1201, 1201, 0), "validation": (100, 100, 0)}
    assert report["splits"]["train"]["labels"] == MTS_TRAIN_LABELS
    assert report["splits"]["validation"]["labels"]["FAM/SOCHX"] == 22
    assert report["splits"]["validation"]["labels"]["GENHX"] == 20
    assert {f["path"]: f["line_endings"] for f in report["files"]} == {
        "MTS-Dialog-TrainingSet.csv": "CRLF", "MTS-Dialog-ValidationSet.csv": "mixed"}


def test_mts_records_and_embedded_crlf(mts_out):
    out, _ = mts_out
    recs = all_records(out)
    first = recs["mts_dialog-train-0"]
    assert first["meta"] == {"source": "mts_dialog", "task": "dialogue2note", "lang": "en",
                             "label": "GENHX"}
    assert user_and_answer(first)[1].startswith("The patient is a 76-year-old white female "
                                                "who presents to the clinic today")
    user, answer = user_and_answer(recs["mts_dialog-train-5"])
    # CRLF inside the quoted dialogue of the training file becomes LF
    assert "inhaler again? \nPatient: Much better." in user and "\r" not in user
    assert user.endswith('Write the "past medical history" section of the clinical note.')
    assert answer == "Asthma."
    assert recs["mts_dialog-train-1200"]["meta"]["label"] == "FAM/SOCHX"
    val_user, _ = user_and_answer(recs["mts_dialog-validation-0"])
    assert "Doctor: When did your pain begin? \nPatient: I've had low back pain" in val_user
    assert recs["mts_dialog-validation-99"]["meta"]["label"] == "ASSESSMENT"


# ---------------------------------------------------------------------------------- ACI-Bench

def test_aci_csv_and_json_forms_agree(shared_data, tmp_path):
    csv_report = aci_bench.convert(shared_data / "aci_bench", tmp_path / "csv")
    json_report = aci_bench.convert(shared_data / "aci_bench" / "challenge_data_json",
                                    tmp_path / "json")
    for report in (csv_report, json_report):
        assert {s: v["out"] for s, v in report["splits"].items()} == {"train": 67,
                                                                      "validation": 20}
    # the folder holds both forms: the CSV (with metadata) is converted, the JSON named ignored
    assert {i["path"] for i in csv_report["ignored_files"]} == {
        "challenge_data_json/train.json", "challenge_data_json/valid.json"}
    a, b = all_records(tmp_path / "csv"), all_records(tmp_path / "json")
    assert list(a) == list(b)
    assert all(a[k]["messages"] == b[k]["messages"] for k in a)
    first = a["aci_bench-train-D2N001"]
    assert first["meta"] == {"source": "aci_bench", "task": "dialogue2note", "lang": "en",
                             "encounter_id": "D2N001", "subset": "virtassist",
                             "chief_complaint": "annual exam", "patient_gender": "female",
                             "patient_age": 50}
    user, note = user_and_answer(first)
    assert "[doctor] hi , martha . how are you ?\n[patient] i'm doing okay ." in user
    assert note.startswith("CHIEF COMPLAINT\n\nAnnual exam.\n\nHISTORY OF PRESENT ILLNESS")
    assert b["aci_bench-train-D2N001"]["meta"]["subset"] == "virtassist"  # from "D2N001-virtassist"
    assert "aci_bench-train-D2N067" in a
    last_user, last_note = user_and_answer(a["aci_bench-validation-D2N087"])
    assert "[doctor] hi richard how are you the medical assistant told m" in last_user
    assert last_note.startswith("CHIEF COMPLAINT\n\nTick bite.\n\nMEDICAL HISTORY")
    assert a["aci_bench-validation-D2N087"]["meta"]["subset"] == "aci"
    subsets = [r["meta"]["subset"] for r in a.values() if "-train-" in r["id"]]
    assert {s: subsets.count(s) for s in set(subsets)} == {"aci": 35, "virtassist": 20,
                                                          "virtscribe": 12}


# ---------------------------------------------------------------------------------- SumPubMed

def test_sumpubmed(shared_data, tmp_path):
    report = sumpubmed.convert(shared_data / "sumpubmed", tmp_path / "long")
    splits = report["splits"]
    assert {s: v["out"] for s, v in splits.items()} == {"train": 120, "validation": 15,
                                                        "test": 15}
    assert len(report["files"]) == 300  # 150 articles + 150 abstracts
    recs = all_records(tmp_path / "long")
    two = next(r for r in recs.values() if r["meta"]["article"] == 2)
    user, answer = user_and_answer(two)
    assert user.startswith("Write the abstract of this biomedical article.\n\nBACKGROUND\n"
                           "label-free proteomics\n")
    assert answer.startswith("BACKGROUND\nthe goal of many proteomics experiments")
    assert sorted(r["meta"]["article"] for r in recs.values()) == list(range(1, 151))
    last = next(r for r in recs.values() if r["meta"]["article"] == 150)
    assert user_and_answer(last)[0].split("\n\n", 1)[1].startswith(
        "BACKGROUND\nmany tissues or organs have an inherent property of growing")
    assert user_and_answer(last)[1].startswith("BACKGROUND\nseveral studies have shown that organ")

    short = sumpubmed.convert(shared_data / "sumpubmed", tmp_path / "short",
                              target="shorter_abstract")
    assert short["options"]["target"] == "shorter_abstract"
    two_short = next(r for r in all_records(tmp_path / "short").values()
                     if r["meta"]["article"] == 2)
    assert user_and_answer(two_short)[1].startswith(
        "the goal of many proteomics experiments is to determine the abundance of proteins in "
        "biological samples, and the variation thereof in various physiological conditions.\n"
        "we compare")
    assert two_short["id"] == two["id"]  # same seeded split whatever the target


# ------------------------------------------------------------------------------------- Toyhom

TOYHOM_DEPARTMENTS = {"神经科": 571, "心血管科": 368, "内分泌科": 304, "肝病科": 92, "呼吸科": 64,
                      "消化科": 43, "肾内科": 41, "风湿免疫科": 7, "血液科": 5, "普通内科": 3,
                      "感染科": 2}


@pytest.fixture(scope="module")
def toyhom_out(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("toyhom")
    return out, chinese_medical_dialogue.convert(shared_data / "chinese_medical_dialogue", out)


def test_toyhom_gb18030_counts_labels(toyhom_out):
    _, report = toyhom_out
    assert [(f["path"], f["encoding"]) for f in report["files"]] == [
        ("样例_内科5000-6000.csv", "gb18030")]
    assert report["totals"] == {"in": 1500, "out": 1500, "skipped": 0}
    labels = {}
    for s in report["splits"].values():
        for k, n in s["labels"].items():
            labels[k] = labels.get(k, 0) + n
    assert labels == TOYHOM_DEPARTMENTS
    # seeded 80/10/10 split; a group of identical questions is never cut, so a held-out split
    # may exceed its 150 by the size of the last group it took
    sizes = {s: v["out"] for s, v in report["splits"].items()}
    assert sum(sizes.values()) == 1500 and set(sizes) == {"train", "validation", "test"}
    assert 150 <= sizes["validation"] <= 152 and 150 <= sizes["test"] <= 152
    # duplicates are kept but never straddle splits; the file has 1,431 distinct (ask, answer)
    # pairs among its 1,500 rows
    assert all(not s["overlap"] for s in report["splits"].values())
    assert sum(s["duplicates"] for s in report["splits"].values()) == 1500 - 1431


def test_toyhom_records(toyhom_out):
    out, _ = toyhom_out
    recs = {int(k.rsplit("-", 1)[1]): r for k, r in all_records(out).items()}
    assert len(recs) == 1500
    user, answer = user_and_answer(recs[0])
    assert user == "我有高血压这两天女婿来的时候给我拿了些党参泡水喝，您好高血压可以吃党参吗？"
    assert answer.startswith("高血压病人可以口服党参的。")
    assert recs[0]["meta"]["label"] == "心血管科" and recs[0]["meta"]["title"] == "高血压患者能吃党参吗？"
    assert user_and_answer(recs[1499])[0].startswith("现在油腻的东西吃多了")
    assert user_and_answer(recs[1005])[0] == "小孩癫痫有什么特征"  # ask is "无": the title asks
    multi = user_and_answer(recs[1010])[1]  # quoted answer spanning several lines
    assert multi.startswith("一、药物治疗：\n\n") and "①大发作选用苯巴比妥" in multi
    assert user_and_answer(recs[1015])[0].startswith("患者男，58岁，以前身体状况良好。\n此病情；\n")


# ------------------------------------------------------------------------------------ BenTsao

def test_bentsao_jsonl_named_json(shared_data, tmp_path):
    report = bentsao.convert(shared_data / "bentsao_huatuo_llama_med", tmp_path)
    assert report["files"][0]["format"] == "jsonl"
    assert report["totals"] == {"in": 1500, "out": 1500, "skipped": 0}
    sizes = {s: v["out"] for s, v in report["splits"].items()}
    assert sum(sizes.values()) == 1500 and 150 <= sizes["test"] <= 151  # one repeated instruction
    assert all(not s["overlap"] for s in report["splits"].values())
    recs = {int(k.rsplit("-", 1)[1]): r for k, r in all_records(tmp_path).items()}
    lines = (shared_data / "bentsao_huatuo_llama_med" / "data" / "llama_data.json").read_text(
        encoding="utf-8").splitlines()
    for i in (0, 1499):
        src = json.loads(lines[i])
        assert user_and_answer(recs[i]) == (src["instruction"], src["output"])
        assert recs[i]["meta"] == {"source": "bentsao", "task": "instruction", "lang": "zh"}
    assert user_and_answer(recs[0])[0].startswith("一名年龄在70岁的女性，出现了晕厥")
