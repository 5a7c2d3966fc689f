"""QA converters on the real samples: PubMedQA PQA-L, and CMB-Clin with both answer keys."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from sparsedoc.prep import cmb, pubmedqa
from sparsedoc.data.schema import read_jsonl


# ----------------------------------------------------------------------------------- PubMedQA

@pytest.fixture(scope="module")
def pubmedqa_out(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("pubmedqa")
    return out, pubmedqa.convert(shared_data / "pubmedqa", out)


def test_pubmedqa_pool_split(pubmedqa_out):
    out, report = pubmedqa_out
    splits = report["splits"]
    assert set(splits) == {"train", "validation"}  # no ground truth here: the official pool
    assert sum(s["in"] for s in splits.values()) == 500
    assert sum(s["out"] for s in splits.values()) == 500
    total = Counter()
    for s in splits.values():
        total.update(s["answers"])
    assert total == {"yes": 276, "no": 169, "maybe": 55}
    # stratified: each label keeps ~10% in validation (round(27.6), round(16.9), round(5.5))
    assert splits["validation"]["answers"] == {"yes": 28, "no": 17, "maybe": 6}
    assert any("test_ground_truth.json" in w for w in report["warnings"])


def test_pubmedqa_records(pubmedqa_out):
    out, _ = pubmedqa_out
    records = {r["meta"]["pmid"]: r for split in ("train", "validation")
               for r in read_jsonl(out / f"{split}.jsonl")}
    first = records["10808977"]  # first key of the file
    user, assistant = first["messages"][0]["content"], first["messages"][1]["content"]
    assert user.startswith("BACKGROUND: Telephone counseling and tailored print communications")
    assert "\nDESIGN: Three-year randomized field trial.\n" in user
    assert "Question: Can tailored interventions increase mammography use among HMO women?" in user
    assert assistant.startswith("Answer: yes\nThe effects of the intervention were most "
                                "pronounced after the first intervention.")
    assert first["meta"]["answer"] == "yes" and first["meta"]["year"] == "2000"
    assert first["id"].endswith("-10808977")
    last = records["17559449"]  # last key of the file
    user, assistant = last["messages"][0]["content"], last["messages"][1]["content"]
    assert user.startswith("OBJECTIVE: ")
    assert "Question: Are sugars-free medicines more erosive than sugars-containing medicines?" \
        in user
    assert assistant.startswith("Answer: no\nPaediatric SF medicines were not more erosive")
    assert last["meta"]["answer"] == "no" and last["meta"]["year"] == "2007"


def test_pubmedqa_split_is_seeded_and_stable(shared_data, tmp_path, pubmedqa_out):
    out, _ = pubmedqa_out
    again = pubmedqa.convert(shared_data / "pubmedqa", tmp_path / "same")
    assert (tmp_path / "same" / "validation.jsonl").read_bytes() == \
        (out / "validation.jsonl").read_bytes()
    other = pubmedqa.convert(shared_data / "pubmedqa", tmp_path / "other", seed=1)
    ids = {r["id"] for r in read_jsonl(tmp_path / "other" / "validation.jsonl")}
    assert ids != {r["id"] for r in read_jsonl(out / "validation.jsonl")}
    assert other["splits"]["validation"]["answers"] == again["splits"]["validation"]["answers"]


def test_pubmedqa_official_test_from_ground_truth(shared_data, tmp_path):
    """PMIDs in test_ground_truth.json form the test split; a disagreeing label is a skip."""
    src = tmp_path / "data"
    src.mkdir()
    (src / "ori_pqal.json").symlink_to(shared_data / "pubmedqa" / "ori_pqal.json")
    (src / "pqal_fold0").mkdir()  # what PubMedQA's split_dataset.py leaves beside the release
    (src / "pqal_fold0" / "dev_set.json").symlink_to(shared_data / "pubmedqa" / "ori_pqal.json")
    truth = {"10808977": "yes", "23831910": "no", "17113061": "yes", "99999999": "no"}
    pool = json.loads((shared_data / "pubmedqa" / "ori_pqal.json").read_text())
    assert pool["23831910"]["final_decision"] != "no" or pool["17113061"]["final_decision"] \
        != "yes"  # the fixture really contains a disagreement
    (src / "test_ground_truth.json").write_text(json.dumps(truth))
    report = pubmedqa.convert(src, tmp_path / "out")
    test = report["splits"]["test"]
    agree = sum(pool[p]["final_decision"] == truth[p] for p in list(truth)[:3])
    assert (test["in"], test["out"], test["skipped"]) == (3, agree, 3 - agree)
    assert test["skip_kinds"] == {"label_mismatch": 3 - agree}
    assert "disagrees with test_ground_truth.json" in test["skips"][0]["reason"]
    assert report["splits"]["train"]["in"] + report["splits"]["validation"]["in"] == 497
    assert [i["path"] for i in report["ignored_files"]] == ["pqal_fold0/dev_set.json"]
    assert any("1 PMIDs of the test ground truth are not in the input" in w
               for w in report["warnings"])


# ----------------------------------------------------------------------------------- CMB-Clin

@pytest.fixture(scope="module")
def clin_out(shared_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cmb_clin")
    return out, cmb.convert(shared_data / "cmb", out)  # auto: only CMB-Clin is there


def test_cmb_clin_cases_become_conversations(clin_out):
    out, report = clin_out
    assert report["source"] == "cmb_clin"
    assert (report["splits"]["test"]["in"], report["splits"]["test"]["out"]) == (50, 50)
    test = read_jsonl(out / "test.jsonl")
    assert sum(sum(m["role"] == "assistant" for m in r["messages"]) for r in test) == 136
    assert Counter(r["meta"]["n_questions"] for r in test) == {3: 34, 2: 12, 1: 2, 4: 2}
    first = test[0]
    assert first["id"] == "cmb_clin-test-0"
    assert first["messages"][0]["content"].startswith("以下是一位病人的病例：\n现病史\n（1）病史摘要\n")
    assert first["messages"][0]["content"].endswith("简述该病人的诊断及诊断依据。")
    assert first["messages"][1]["content"].startswith("诊断：嵌顿性腹股沟斜疝合并肠梗阻。")
    assert first["messages"][2] == {"role": "user", "content": "简述该病人的鉴别诊断。"}
    assert "\r" not in json.dumps(test, ensure_ascii=False)  # CRLF file, LF text
    assert test[-1]["id"] == "cmb_clin-test-49" and test[-1]["meta"]["title"] == "案例分析-精索静脉曲张"


def test_cmb_clin_labels_are_chapters(clin_out):
    _, report = clin_out
    labels = report["splits"]["test"]["labels"]
    assert labels["(none)"] == 20  # titles "案例分析-…" name no chapter
    assert labels["泌尿、男生殖系统肿瘤"] == 5
    assert labels["胆道疾病"] == 3 and labels["结、直肠与肛管疾病"] == 3
    assert sum(labels.values()) == 50 and len(labels) == 20  # (none) + 19 chapters


def test_cmb_clin_released_solution_key(tmp_path, shared_data):
    """The released CMB-Clin names the answer 'solution' and writes integer ids."""
    cases = json.loads((shared_data / "cmb" / "CME-test-qa" / "CMB-test-qa.json").read_text(
        encoding="utf-8"))[:3]
    released = [{**c, "id": int(c["id"]), "QA_pairs": [
        {"question": qa["question"], "solution": qa["answer"]} for qa in c["QA_pairs"]]}
        for c in cases]
    src = tmp_path / "CMB-Clin" / "CMB-Clin-qa.json"
    src.parent.mkdir()
    src.write_text(json.dumps(released, ensure_ascii=False, indent=4), encoding="utf-8")
    report = cmb.convert(src.parent, tmp_path / "out", part="clin")
    test = read_jsonl(tmp_path / "out" / "test.jsonl")
    assert report["splits"]["test"]["out"] == 3
    assert test[0]["messages"][1]["content"] == cases[0]["QA_pairs"][0]["answer"].strip()
    assert [r["id"] for r in test] == ["cmb_clin-test-0", "cmb_clin-test-1", "cmb_clin-test-2"]
