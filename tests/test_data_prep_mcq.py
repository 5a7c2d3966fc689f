"""MCQ converters on the real samples: CMExam, CMMLU medical subjects, MedQA, CMB-Exam.

Expected numbers were counted from the files with pandas / the csv module, independently of the
converters (see each SOURCE.md for the same counts).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from sparsedoc.prep import cmb, cmexam, cmmlu_med, medqa
from sparsedoc.data.schema import read_jsonl


def by_id(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in records}


# ------------------------------------------------------------------------------------ CMExam

@pytest.fixture(scope="module")
def cmexam_out(shared_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cmexam")
    return out, cmexam.convert(shared_data / "cmexam", out)


def test_cmexam_counts_and_splits(cmexam_out):
    out, report = cmexam_out
    assert {s: (v["in"], v["out"], v["skipped"]) for s, v in report["splits"].items()} == {
        "validation": (800, 800, 0), "test": (49, 49, 0)}
    assert sorted(p.name for p in out.glob("*.jsonl")) == ["test.jsonl", "validation.jsonl"]
    assert len(read_jsonl(out / "validation.jsonl")) == 800
    assert {f["path"]: f["encoding"] for f in report["files"]} == {
        "data/val.csv": "utf-8", "data/test_with_annotations.csv": "utf-8"}
    # CRLF between rows, LF inside the quoted Options field
    assert {f["line_endings"] for f in report["files"]} == {"mixed"}


def test_cmexam_first_last_and_embedded_newlines(cmexam_out):
    out, _ = cmexam_out
    val = read_jsonl(out / "validation.jsonl")
    first, last = val[0], val[-1]
    assert first["id"] == "cmexam-validation-0"
    assert first["question"] == "上消化道出血可单纯表现为呕血或黑便，也可两者兼有，这取决于"
    # the Options field spans five physical lines in the file
    assert first["options"] == {"A": "原发病", "B": "出血部位", "C": "出血量",
                                "D": "在胃内停留时间", "E": "以上均非"}
    assert first["answer"] == "C"
    assert first["explanation"].startswith("上消化道出血表现为呕血还是便血")
    assert first["meta"] == {"source": "cmexam", "task": "mcq", "lang": "zh",
                             "subject": "medicine"}
    assert last["id"] == "cmexam-validation-799" and last["answer"] == "E"
    assert last["question"].startswith("某男，1岁。不思乳食")


def test_cmexam_multi_answer_four_options_empty_explanation(cmexam_out):
    out, _ = cmexam_out
    val = by_id(read_jsonl(out / "validation.jsonl"))
    assert val["cmexam-validation-601"]["answer"] == "ABCDE"  # 多选, kept as a set
    four = val["cmexam-validation-432"]
    assert four["options"] == {"A": "Ⅱ类洞", "B": "Ⅰ类洞", "C": "Ⅲ类洞", "D": "Ⅳ类洞"}
    assert four["answer"] == "B"
    assert "explanation" not in val["cmexam-validation-607"]  # empty in the file
    assert "explanation" not in val["cmexam-validation-53"]  # placeholder 请等待更新
    assert '"生我"者为母' in val["cmexam-validation-237"]["explanation"]  # raw quote kept
    answers = Counter(r["answer"] for r in val.values())
    assert sum(n for a, n in answers.items() if len(a) > 1) == 25
    assert (answers["C"], answers["B"], answers["D"], answers["A"], answers["E"]) == (
        173, 163, 160, 153, 126)
    assert sum(len(r["options"]) == 4 for r in val.values()) == 8
    assert sum("explanation" not in r for r in val.values()) == 11  # 10 empty + 1 placeholder


def test_cmexam_test_split_annotations(cmexam_out):
    out, report = cmexam_out
    test = read_jsonl(out / "test.jsonl")
    assert test[0]["meta"]["subject"] == "临床医学" and "label" not in test[0]["meta"]  # 不符合
    assert test[0]["meta"]["difficulty"] == 3
    four = test[9]
    assert list(four["options"]) == ["A", "B", "C", "D"] and four["answer"] == "C"
    assert four["meta"]["subject"] == "药学"
    # label = clinical department when annotated, else falls back to the discipline (subject)
    assert report["splits"]["test"]["labels"] == {
        "口腔科": 8, "临床医学": 7, "中医科": 7, "药学": 5, "公卫预防": 4, "眼科": 3, "内科": 3,
        "妇产科": 3, "中药学": 1, "急诊医学科": 1, "医学影像科": 1, "儿科": 1, "结核病科": 1,
        "口腔医学": 1, "职业病科": 1, "精神科": 1, "中医学": 1}
    assert report["splits"]["validation"]["labels"] == {"medicine": 800}
    assert sum("explanation" not in r for r in test) == 4


# ------------------------------------------------------------------------------------- CMMLU

CMMLU_TEST = {"anatomy": 89, "clinical_knowledge": 143, "college_medicine": 164, "genetics": 106,
              "nutrition": 87, "professional_medicine": 226, "traditional_chinese_medicine": 111,
              "virology": 102}


@pytest.fixture(scope="module")
def cmmlu_out(shared_data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cmmlu")
    return out, cmmlu_med.convert(shared_data / "cmmlu_med", out)


def test_cmmlu_counts_per_subject(cmmlu_out):
    out, report = cmmlu_out
    assert (report["splits"]["dev"]["out"], report["splits"]["test"]["out"]) == (40, 1028)
    assert report["splits"]["test"]["labels"] == CMMLU_TEST
    assert report["splits"]["dev"]["labels"] == {s: 5 for s in CMMLU_TEST}
    # all medical subjects are known by name, including the one missing from the sample
    assert "college_medical_statistics" in cmmlu_med.MEDICAL_SUBJECTS
    assert any("college_medical_statistics" in w for w in report["warnings"])


def test_cmmlu_records(cmmlu_out):
    out, _ = cmmlu_out
    test = read_jsonl(out / "test.jsonl")
    ck = by_id(test)["cmmlu_med-test-clinical_knowledge-0"]
    assert ck["question"].startswith("男性，45 岁，体重 65kg。因胆囊结石")
    assert ck["options"] == {"A": "1000mL", "B": "500mL", "C": "2000mL", "D": "1500mL"}
    assert ck["answer"] == "D"
    assert ck["meta"] == {"source": "cmmlu_med", "task": "mcq", "lang": "zh",
                          "subject": "clinical_knowledge", "subject_zh": "临床知识",
                          "label": "clinical_knowledge"}
    last = by_id(test)["cmmlu_med-test-virology-101"]  # id = the pandas index column
    assert last["options"]["D"] == "分别位于 12 个顶角上、20 个面上、30 条棱上"
    assert last["answer"] == "A"
    assert all(len(r["options"]) == 4 for r in test)


def test_cmmlu_subject_subset(shared_data, tmp_path):
    report = cmmlu_med.convert(shared_data / "cmmlu_med", tmp_path,
                               subjects=["genetics", "virology"])
    assert report["splits"]["test"]["labels"] == {"genetics": 106, "virology": 102}
    assert len(report["ignored_files"]) == 12  # the other six subjects, dev + test


# ------------------------------------------------------------------------------------- MedQA

def test_medqa(shared_data, tmp_path):
    report = medqa.convert(shared_data / "medqa_usmle", tmp_path)
    test = read_jsonl(tmp_path / "test.jsonl")
    assert (report["splits"]["test"]["in"], len(test)) == (800, 800)
    assert report["splits"]["test"]["labels"] == {"step1": 432, "step2&3": 368}
    assert report["splits"]["test"]["answers"] == {"A": 170, "B": 172, "C": 154, "D": 178,
                                                   "E": 126}
    first = test[0]
    assert first["id"] == "medqa-test-0" and first["answer"] == "C"
    assert first["options"]["C"] == ("Tell the attending that he cannot fail to disclose this "
                                     "mistake")
    assert first["meta"] == {"source": "medqa", "task": "mcq", "lang": "en", "subject": "step1",
                             "label": "step1"}
    assert test[-1]["id"] == "medqa-test-799" and test[-1]["answer"] == "C"
    assert test[-1]["question"].startswith("A 68-year-old woman presents to the emergency room")


def test_medqa_four_and_five_options_together(shared_data, tmp_path):
    """The 4-option release beside the 5-option one: both convert, ids stay unique."""
    src = tmp_path / "US"
    (src / "4_options").mkdir(parents=True)
    lines = (shared_data / "medqa_usmle" / "test.jsonl").read_text(encoding="utf-8").splitlines()
    (src / "test.jsonl").write_text("\n".join(lines[:3]) + "\n", encoding="utf-8")
    four = []
    for line in lines[:3]:
        rec = json.loads(line)
        keep = [k for k in "ABCDE" if k != ("E" if rec["answer_idx"] != "E" else "D")]
        opts = {new: rec["options"][old] for new, old in zip("ABCD", keep)}
        idx = next(k for k, v in opts.items() if v == rec["answer"])
        four.append(json.dumps({**rec, "options": opts, "answer_idx": idx,
                                "metamap_phrases": []}))
    (src / "4_options" / "phrases_no_exclude_test.jsonl").write_text("\n".join(four) + "\n",
                                                                     encoding="utf-8")
    report = medqa.convert(src, tmp_path / "out")
    test = read_jsonl(tmp_path / "out" / "test.jsonl")  # read_jsonl rejects duplicate ids
    assert report["splits"]["test"]["out"] == 6
    assert Counter(len(r["options"]) for r in test) == {4: 3, 5: 3}
    assert {r["id"] for r in test} >= {"medqa-test-test-0",
                                       "medqa-test-4_options_phrases_no_exclude_test-0"}


# ---------------------------------------------------------------------------------- CMB-Exam

def _cmb_exam_release(root: Path) -> Path:
    """A small CMB-Exam tree in the released layout (the sample has no CMB-Exam questions)."""
    item = {"exam_type": "医师考试", "exam_class": "执业医师", "exam_subject": "口腔执业医师",
            "question": "患者，男性，11岁。此男孩可能患", "answer": "D", "question_type": "单项选择题",
            "option": {"A": "小叶型肺炎", "B": "浸润性肺结核", "C": "继发性肺结核",
                       "D": "原发性肺结核", "E": "粟粒型肺结核"}}
    multi = {**item, "exam_subject": "眼科", "question_type": "多项选择题", "answer": "ACE",
             "question": "下列哪些属于眼球屈光装置"}
    for split, name in (("train", "CMB-train/CMB-train-merge.json"),
                        ("val", "CMB-val/CMB-val-merge.json")):
        path = root / "CMB-Exam" / name
        path.parent.mkdir(parents=True)
        extra = {"explanation": "原发综合征。"} if split == "val" else {}
        path.write_text(json.dumps([{**item, **extra}, {**multi, **extra}], ensure_ascii=False,
                                   indent=4), encoding="utf-8")
    test = root / "CMB-Exam" / "CMB-test" / "CMB-test-choice-question-merge.json"
    test.parent.mkdir(parents=True)
    no_answer = {k: v for k, v in item.items() if k != "answer"}
    test.write_text(json.dumps([{"id": 1, **no_answer}, {"id": 2, **no_answer}],
                               ensure_ascii=False), encoding="utf-8")
    (root / "CMB-test-choice-answer.json").write_text(json.dumps(
        [{"id": 1, "answer": "B"}, {"id": 2, "answer": "BD"}]), encoding="utf-8")
    return root


def test_cmb_exam_released_layout(tmp_path):
    src = _cmb_exam_release(tmp_path / "CMB")
    report = cmb.convert(src, tmp_path / "out", part="exam")
    assert report["source"] == "cmb_exam"
    assert {s: v["out"] for s, v in report["splits"].items()} == {"train": 2, "validation": 2,
                                                                  "test": 2}
    train = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert train[1]["answer"] == "ACE" and train[1]["meta"]["label"] == "眼科"
    assert train[0]["meta"]["question_type"] == "单项选择题"
    val = read_jsonl(tmp_path / "out" / "validation.jsonl")
    assert val[0]["explanation"] == "原发综合征。"
    test = read_jsonl(tmp_path / "out" / "test.jsonl")  # answers joined from the answer key
    assert [(r["id"], r["answer"]) for r in test] == [("cmb_exam-test-1", "B"),
                                                      ("cmb_exam-test-2", "BD")]


def test_cmb_auto_part_refuses_mixed_folder(tmp_path, shared_data):
    src = _cmb_exam_release(tmp_path / "CMB")
    clin = src / "CMB-Clin" / "CMB-Clin-qa.json"
    clin.parent.mkdir()
    clin.write_bytes((shared_data / "cmb" / "CME-test-qa" / "CMB-test-qa.json").read_bytes())
    with pytest.raises(cmb.ConvertError, match="prepare cmb_exam / cmb_clin"):
        cmb.convert(src, tmp_path / "out")
    assert cmb.convert(src, tmp_path / "clin", part="clin")["splits"]["test"]["out"] == 50
