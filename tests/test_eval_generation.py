"""Generation scoring: ROUGE against rouge-score itself, Chinese on characters, BERTScore
offline with the bundled MiniLM, and batched (left-padded) generation equal to one-by-one."""

from __future__ import annotations

import pytest
import torch

from sparsedoc.eval.generation import (CharTokenizer, bertscore_f1, bundled_bertscore_model,
                                       gen_items, generate, generation_config, rouge_scores)

PAIRS = [
    ("The patient reports chest pain radiating to the left arm for two days.",
     "Patient has had chest pain radiating to his left arm for 2 days."),
    ("No known drug allergies.\nTakes lisinopril 20 mg daily.",
     "Allergies: none known.\nMedications: lisinopril 20 mg once a day."),
    ("the cat sat on the mat", "the cat ran"),
]


def test_english_rouge_equals_rouge_score_reference():
    from rouge_score import rouge_scorer

    ref_scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"],
                                          use_stemmer=True)
    preds, refs = [p for _, p in PAIRS], [r for r, _ in PAIRS]
    ours = rouge_scores(preds, refs, ["en"] * len(PAIRS))
    for o, pred, ref in zip(ours, preds, refs):
        expected = ref_scorer.score(ref, pred)
        assert o == pytest.approx({k: v.fmeasure for k, v in expected.items()}, abs=1e-12)
    # by hand: "the cat ran" vs "the cat sat on the mat": unigram P = 2/3, R = 2/6
    p, r = 2 / 3, 2 / 6
    assert ours[2]["rouge1"] == pytest.approx(2 * p * r / (p + r))
    assert ours[2]["rouge2"] == pytest.approx(2 * (1 / 2) * (1 / 5) / (1 / 2 + 1 / 5))


def test_chinese_rouge_is_scored_on_characters():
    from rouge_score import rouge_scorer

    assert CharTokenizer().tokenize("患者发热3天，CT正常。") == \
        ["患", "者", "发", "热", "3", "天", "ct", "正", "常"]
    ref, pred = "患者发热三天", "患者发热两天"
    # rouge-score's own tokenizer drops every non-ASCII character: Chinese would score 0
    default = rouge_scorer.RougeScorer(["rouge1"]).score(ref, pred)["rouge1"].fmeasure
    assert default == 0.0
    s = rouge_scores([pred], [ref], ["zh"])[0]
    assert s["rouge1"] == pytest.approx(5 / 6)  # 5 of 6 characters shared
    assert s["rouge2"] == pytest.approx(3 / 5)  # 患者 者发 发热 of 5 bigrams
    assert s["rougeL"] == pytest.approx(5 / 6)  # LCS 患者发热天
    full = rouge_scores(["头痛伴恶心\n建议休息"], ["头痛伴恶心\n建议休息"], ["zh"])[0]
    assert full == pytest.approx({"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0, "rougeLsum": 1.0})


def test_bertscore_offline_with_bundled_minilm():
    import bert_score

    model_dir = bundled_bertscore_model()
    assert model_dir is not None and (model_dir / "config.json").is_file()
    cands = ["The patient has a fever.", "Hello world", "chest pain"]
    refs = ["The patient has a fever.", "Take two tablets daily.", "pain in the chest"]
    f1 = bertscore_f1(cands, refs, model_dir, num_layers=6)
    assert f1[0] == pytest.approx(1.0, abs=1e-5)
    assert f1[2] > f1[1]
    _, _, ref = bert_score.score(cands, refs, model_type=str(model_dir), num_layers=6)
    assert f1 == pytest.approx(ref.tolist(), abs=1e-6)
    # an empty prediction (a model that stopped at once) scores 0 and leaves the others as
    # bert-score scores them (bert-score itself fails on the empty string here)
    assert bertscore_f1(["", *cands], ["Some reference.", *refs], model_dir, num_layers=6) == \
        pytest.approx([0.0, *ref.tolist()], abs=1e-6)


def test_batched_left_padded_generation_equals_one_by_one(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sparsedoc.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [tok(t)["input_ids"] for t in ("Hi", "Tell me about the heart and its valves",
                                             "Kidney?")]
    gc = generation_config(model, tok, max_new_tokens=6)
    assert gc.do_sample is False and gc.max_new_tokens == 6
    batched = generate(model, tok, prompts, gc)
    single = [generate(model, tok, [p], gc)[0] for p in prompts]
    assert batched == single
    assert all(r["new_tokens"] <= 6 for r in batched)


def test_multi_turn_records_give_one_item_per_answer():
    rec = {"id": "case1", "messages": [
        {"role": "user", "content": "病例……问题一？"}, {"role": "assistant", "content": "答一"},
        {"role": "user", "content": "问题二？"}, {"role": "assistant", "content": "答二"}],
        "meta": {"source": "cmb_clin", "task": "clinical_qa", "lang": "zh", "label": "外科"}}
    items = gen_items(rec)
    assert [i.id for i in items] == ["case1#0", "case1#1"]
    assert [i.reference for i in items] == ["答一", "答二"]
    assert [m["content"] for m in items[1].messages] == ["病例……问题一？", "答一", "问题二？"]
    assert items[0].lang == "zh" and items[0].label == "外科"


def test_long_generation_prompt_loses_middle_dialogue_lines_not_its_instruction(tiny_model_dir):
    """A dialogue longer than the prompt budget is shortened like training data: its first line
    and its final instruction stay, middle lines go; a budget below the template's own tokens is
    the only case cut on the left."""
    from types import SimpleNamespace

    from sparsedoc.eval.generation import GenItem, fit_prompt
    from sparsedoc.models.load import load_tokenizer

    tok = load_tokenizer(str(tiny_model_dir))
    lines = ["[doctor] good morning, what brings you in today?"]
    lines += [f"[patient] line {i}: the pain in my knee started after the {i}th run" for i in range(60)]
    lines += ["Write the clinical note for this encounter."]
    item = GenItem("enc-1", [{"role": "user", "content": "\n".join(lines)}], "note", "en")
    cfg = SimpleNamespace(prompt_format="chat", system_prompt="")
    whole = tok(tok.apply_chat_template(item.messages, tokenize=False, add_generation_prompt=True),
                add_special_tokens=False)["input_ids"]
    budget = len(whole) // 2
    ids, how = fit_prompt(tok, item, cfg, budget)
    text = tok.decode(ids)
    assert how == "shortened" and len(ids) <= budget
    assert lines[0] in text and lines[-1] in text and lines[-2] in text
    kept = [ln for ln in lines[1:-1] if ln in text]
    assert 0 < len(kept) < len(lines) - 2
    assert text.rstrip().endswith(tok.decode(whole[-3:]).rstrip())  # the generation prompt stays
    assert fit_prompt(tok, item, cfg, len(whole)) == (list(whole), "")
    ids, how = fit_prompt(tok, item, cfg, 3)
    assert how == "truncated" and ids == list(whole[-3:])
