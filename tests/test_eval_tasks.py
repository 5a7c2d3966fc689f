"""Task names -> converted data: aliases, default splits, named splits, paths, clear errors."""

from __future__ import annotations

import pytest

from sparsedoc.data.schema import write_jsonl
from sparsedoc.eval.mcq import MCQItem
from sparsedoc.eval.tasks import TaskError, expand_tasks, load_task, locate, subset


def _mcq(i: int, subject: str) -> dict:
    return {"id": f"m{i}", "question": f"Q{i}?", "options": {"A": "x", "B": "y"}, "answer": "A",
            "meta": {"source": "t", "subject": subject, "lang": "en"}}


def _chat(i: int) -> dict:
    return {"id": f"c{i}", "messages": [{"role": "user", "content": f"dialogue {i}"},
                                        {"role": "assistant", "content": f"note {i}"}],
            "meta": {"source": "t", "task": "dialogue2note", "lang": "en"}}


@pytest.fixture
def root(tmp_path):
    write_jsonl(tmp_path / "cmmlu_med" / "test.jsonl", [_mcq(i, f"s{i % 3}") for i in range(30)])
    write_jsonl(tmp_path / "cmmlu_med" / "dev.jsonl", [_mcq(100 + i, f"s{i % 3}")
                                                       for i in range(6)])
    write_jsonl(tmp_path / "mts_dialog" / "validation.jsonl", [_chat(i) for i in range(5)])
    write_jsonl(tmp_path / "mts_dialog" / "train.jsonl", [_chat(10 + i) for i in range(5)])
    return tmp_path


def test_names_aliases_splits_and_paths(root):
    assert locate("cmmlu", root)[:2] == ("cmmlu_med", root / "cmmlu_med" / "test.jsonl")
    assert locate("mts", root)[:2] == ("mts_dialog", root / "mts_dialog" / "validation.jsonl")
    assert locate("mts_dialog:train", root)[:2] == ("mts_dialog_train",
                                                    root / "mts_dialog" / "train.jsonl")
    assert locate("mts_dialog:validation", root)[0] == "mts_dialog"  # the default split
    path = root / "cmmlu_med" / "test.jsonl"
    assert locate(str(path), "nowhere")[:2] == ("cmmlu_med", path)
    assert expand_tasks(["medigen", "mts_dialog", "cmexam"]) == ["aci_bench", "mts_dialog",
                                                                  "cmexam"]
    with pytest.raises(TaskError, match="sparsedoc prepare medqa"):
        locate("medqa", root)
    with pytest.raises(TaskError, match="no split 'dev'"):
        locate("mts_dialog:dev", root)


def test_load_task_limit_is_a_seeded_subset_covering_subjects(root):
    t = load_task("cmmlu_med", root, limit=9, seed=3, num_fewshot=2)
    assert t.kind == "mcq" and t.n_available == 30 and len(t.items) == 9
    assert [i.id for i in t.items] == [i.id for i in load_task("cmmlu_med", root, limit=9,
                                                               seed=3).items]
    order = [int(i.id[1:]) for i in t.items]
    assert order == sorted(order)  # kept in file order
    assert t.fewshot_path.name == "dev.jsonl" and len(t.fewshot) == 6
    assert all(isinstance(i, MCQItem) for i in t.fewshot)
    g = load_task("mts_dialog", root)
    assert g.kind == "generation" and [i.reference for i in g.items][:2] == ["note 0", "note 1"]
    assert subset(list(range(5)), 0, 0) == list(range(5))


def test_mixed_files_and_missing_fewshot_pool_are_errors(root):
    write_jsonl(root / "mixed" / "test.jsonl", [_mcq(1, "s"), _chat(2)])
    with pytest.raises(TaskError, match="mixes"):
        load_task("mixed", root)
    write_jsonl(root / "lonely" / "test.jsonl", [_mcq(1, "s")])
    with pytest.raises(TaskError, match="1-shot needs a dev, train or validation split"):
        load_task("lonely", root, num_fewshot=1)
