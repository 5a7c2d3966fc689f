"""MCQ scorers on a tiny model whose answers are rigged, so the right accuracy is known exactly."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM

from sparsedoc.config import EvalCfg
from sparsedoc.eval import mcq
from sparsedoc.eval.mcq import MCQItem, mcq_item, score_mcq, summarize
from sparsedoc.eval.stats import bootstrap_interval, mean_std, wilson_interval
from sparsedoc.models.load import load_tokenizer

MARKERS = [" apple", " banana", " cherry", " grape", " lemon", " mango", " peach", " plum"]


class RiggedLlama(LlamaForCausalLM):
    """A tiny random Llama with rigged next-token logits: at a position holding a trigger token
    (the end of "Answer:", "答案：" or of the assistant header) after a marker token, it predicts
    that marker's answer token (+100) and optionally a second token (+50); right after a stop
    token it predicts EOS. So loglik picks the rigged letter at exactly the prompt's last
    position, and greedy generation writes the rigged token and stops."""

    rig: dict[int, tuple[int, int | None]] = {}  # marker -> (answer token, second token)
    stop: set[int] = set()
    triggers: set[int] = set()

    def forward(self, input_ids=None, logits_to_keep=0, **kwargs):
        out = super().forward(input_ids=input_ids, logits_to_keep=0, **kwargs)
        logits = out.logits.clone()
        at_trigger = torch.isin(input_ids, torch.tensor(sorted(self.triggers)))
        for marker, (tok, second) in self.rig.items():
            seen = (((input_ids == marker).cumsum(1) > 0) & at_trigger).to(logits.dtype)
            logits[..., tok] += 100 * seen
            if second is not None:
                logits[..., second] += 50 * seen
        after_stop = torch.isin(input_ids, torch.tensor(sorted(self.stop)))
        logits[..., self.config.eos_token_id] += 1000 * after_stop.to(logits.dtype)
        if isinstance(logits_to_keep, int):
            logits = logits[:, -logits_to_keep:] if logits_to_keep else logits
        else:
            logits = logits[:, logits_to_keep]
        out.logits = logits
        return out


def _one_token(tok, text: str) -> int:
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == 1, (text, ids)
    return ids[0]


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    tok = load_tokenizer(str(tiny_model_dir))
    # last tokens of "Answer:", "答案：" and of the chat template's "assistant\n"
    RiggedLlama.triggers = {tok("Answer:")["input_ids"][-1], tok("答案：")["input_ids"][-1],
                            tok("\n")["input_ids"][-1]}
    return tok


def _item(i: int, marker: str, answer: str, subject: str, lang: str = "en") -> MCQItem:
    rec = {"id": f"q{i}", "question": f"Item {i}: which one goes with{marker}?",
           "options": {"A": "red", "B": "green", "C": "blue", "D": "black"}, "answer": answer,
           "meta": {"source": "test", "subject": subject, "lang": lang}}
    return mcq_item(rec)


@pytest.fixture(scope="module")
def rigged(tiny_model_dir, tok):
    """8 items: 0-5 rigged to their gold letter, 6 to a wrong letter, 7 to garbage (" hello",
    with a wrong letter second, which loglik then picks). Subjects: cardio 0-3, neuro 4-7."""
    golds = "ABCDABCD"
    items = [_item(i, MARKERS[i], golds[i], "cardio" if i < 4 else "neuro",
                   lang="zh" if i == 1 else "en") for i in range(8)]
    letter_tok = {(lang, c): _one_token(tok, c if lang == "zh" else " " + c)
                  for lang in ("en", "zh") for c in "ABCD"}
    rig = {}
    for i, it in enumerate(items):
        m = _one_token(tok, MARKERS[i])
        if i < 6:
            rig[m] = (letter_tok[(it.lang, it.answer)], None)
        elif i == 6:
            rig[m] = (letter_tok[(it.lang, "A")], None)  # gold is C
        else:
            rig[m] = (_one_token(tok, " hello"), letter_tok[(it.lang, "B")])  # gold is D
    model = RiggedLlama.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    RiggedLlama.rig = rig
    RiggedLlama.stop = set(letter_tok.values()) | {_one_token(tok, " hello")}
    return model, items


@pytest.mark.parametrize("fmt", ["chat", "plain"])
def test_loglik_scorer_gets_the_rigged_accuracy(rigged, tok, fmt):
    model, items = rigged
    preds, stats = score_mcq(model, tok, items, "loglik", EvalCfg(batch_size=3,
                                                                    prompt_format=fmt))
    assert [p["pred"] for p in preds] == list("ABCDAB") + ["A", "B"]
    s = summarize(items, preds, "loglik")
    assert (s["n"], s["correct"], s["accuracy"]) == (8, 6, 75.0)
    assert s["per_subject"]["cardio"]["accuracy"] == 100.0
    assert s["per_subject"]["neuro"]["accuracy"] == 50.0
    assert s["per_subject"]["neuro"]["n"] == 4
    lo, hi = wilson_interval(6, 8)
    assert s["ci95"] == pytest.approx([100 * lo, 100 * hi])
    assert stats == {"truncated_prompts": 0, "cached": 0}


def test_generate_scorer_parses_and_counts_unparsed(rigged, tok):
    model, items = rigged
    preds, _ = score_mcq(model, tok, items, "generate", EvalCfg(batch_size=4,
                                                                mcq_max_new_tokens=4))
    assert [p["output"] for p in preds] == list("ABCDAB") + ["A", "hello"]
    assert [p["pred"] for p in preds] == list("ABCDAB") + ["A", None]
    s = summarize(items, preds, "generate")
    assert (s["correct"], s["accuracy"], s["unparsed"]) == (6, 75.0, 1)
    assert s["accuracy_parsed"] == pytest.approx(100 * 6 / 7)


def test_yes_no_maybe_record_is_scored_as_three_way_choice(tiny_model_dir, tok):
    rec = {"id": "pq1", "messages": [
        {"role": "user", "content": "Context about a kiwi trial.\n\nQuestion: Does it work?\n"
                                    "Answer the question with yes, no or maybe."},
        {"role": "assistant", "content": "Answer: maybe\nThe evidence is mixed."}],
        "meta": {"source": "pubmedqa", "task": "qa", "lang": "en", "answer": "maybe"}}
    item = mcq_item(rec)
    assert item.text_choices and item.options == {"A": "yes", "B": "no", "C": "maybe"}
    assert item.answer == "C"
    model = RiggedLlama.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    RiggedLlama.rig = {_one_token(tok, " kiwi"): (_one_token(tok, " maybe"), None)}
    RiggedLlama.stop = {_one_token(tok, " maybe")}
    for scorer in ("loglik", "generate"):
        preds, _ = score_mcq(model, tok, [item], scorer, EvalCfg())
        assert preds[0]["pred"] == "C" and preds[0]["correct"], (scorer, preds)
    prompt = mcq.build_prompt(item, [], tok, "chat", "loglik")
    assert prompt.endswith("<|im_start|>assistant\nAnswer:") and "C. maybe" not in prompt


def test_multi_token_path_and_batching_agree_with_single_item_scores(tiny_model_dir, tok):
    model = LlamaForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts = [tok("Question one? Answer:")["input_ids"],
               tok("A much longer second question, with more words. Answer:")["input_ids"]]
    conts = [{c: [_one_token(tok, " " + c)] for c in "ABC"} for _ in prompts]
    fast = mcq.loglik_scores(model, prompts, conts)
    general = mcq.sequence_logprobs(model, [p + conts[i][c] for i, p in enumerate(prompts)
                                            for c in "ABC"], [len(p) for p in prompts
                                                              for _ in "ABC"])
    assert [fast[i][c] for i in range(2) for c in "ABC"] == pytest.approx(general, abs=1e-5)
    alone = [mcq.loglik_scores(model, [p], [c])[0] for p, c in zip(prompts, conts)]
    assert [alone[i][c] for i in range(2) for c in "ABC"] == \
        pytest.approx([fast[i][c] for i in range(2) for c in "ABC"], abs=1e-5)
    # a two-token continuation: the sum of its tokens' log-probs, by a direct forward
    two = tok(" maybe so", add_special_tokens=False)["input_ids"]
    score = mcq.loglik_scores(model, [prompts[0]], [{"A": two, "B": conts[0]["B"]}])[0]["A"]
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([prompts[0] + two])).logits[0], -1)
    n = len(prompts[0])
    assert score == pytest.approx(float(logp[n - 1, two[0]] + logp[n, two[1]]), abs=1e-5)


def test_fewshot_prompts_use_same_subject_shots_and_training_format(tok):
    items = [_item(i, MARKERS[i], "ABCDABCD"[i], "cardio" if i % 2 else "neuro")
             for i in range(8)]
    shots = mcq.select_shots(items[0], items[1:], 3)
    assert [s.id for s in shots] == ["q2", "q4", "q6"]  # neuro first, in pool order
    text = mcq.build_prompt(items[0], shots, tok, "chat", "loglik")
    assert text.count("Answer with the letter of the correct option.") == 4
    assert "Answer: C<|im_end|>" in text and text.endswith("assistant\nAnswer:")
    plain = mcq.build_prompt(items[0], shots, tok, "plain", "loglik")
    assert plain.startswith("The following are multiple choice questions (with answers) about "
                            "neuro.\n\n")
    assert plain.count("\nAnswer:") == 4 and plain.endswith("D. black\nAnswer:")
    assert "\nAnswer: C\n\n" in plain


def test_multi_answer_items_need_the_whole_set():
    rec = {"id": "m", "question": "哪些正确？", "options": {"A": "1", "B": "2", "C": "3"},
           "answer": "AC", "meta": {"source": "t", "subject": "s", "lang": "zh"}}
    item = mcq_item(rec)
    assert mcq.generate_prediction(item, "答案：A、C")["correct"]
    assert not mcq.generate_prediction(item, "答案：A")["correct"]
    assert not mcq.loglik_prediction(item, {"A": -1.0, "B": -2.0, "C": -1.5})["correct"]
    s = summarize([item], [mcq.loglik_prediction(item, {"A": -1.0, "B": -2, "C": -3})], "loglik")
    assert s["n_multi_answer"] == 1


def _bisect(f, lo: float, hi: float, iters: int = 200) -> float:
    """The root of a function that changes sign once on [lo, hi] (f(lo) > 0 >= f(hi))."""
    for _ in range(iters):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if f(mid) > 0 else (lo, mid)
    return (lo + hi) / 2


def _wilson_by_inversion(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Reference Wilson interval, from its definition rather than its closed form: the set of
    proportions p0 that the two-sided score test |p_hat - p0| / sqrt(p0 (1 - p0) / n) <= z does
    not reject, each end found by bisection; z is found by bisection on the normal CDF (erf)."""
    z = _bisect(lambda x: (1 + level) / 2 - 0.5 * (1 + math.erf(x / math.sqrt(2))), 0.0, 10.0)
    p_hat = k / n

    def stat(p0: float) -> float:  # the score statistic, |.| minus z: > 0 means rejected
        return abs(p_hat - p0) / math.sqrt(p0 * (1 - p0) / n) - z

    lo = 0.0 if k == 0 else _bisect(stat, 0.0, p_hat)
    hi = 1.0 if k == n else 1 - _bisect(lambda q: stat(1 - q), 0.0, 1 - p_hat)
    return lo, hi


def test_intervals_and_seed_statistics():
    # hand-checked: at 0/n the upper end is z^2 / (n + z^2) = 3.8415 / 13.8415 for n = 10
    assert _wilson_by_inversion(0, 10) == pytest.approx((0.0, 0.27753), abs=1e-5)
    assert _wilson_by_inversion(10, 10) == pytest.approx((0.72247, 1.0), abs=1e-5)
    assert _wilson_by_inversion(6, 8) == pytest.approx((0.40928, 0.92852), abs=1e-5)
    for k, n in [(6, 8), (0, 10), (10, 10), (31, 100), (1, 3), (999, 1000)]:
        assert wilson_interval(k, n) == pytest.approx(_wilson_by_inversion(k, n), abs=1e-9)
    # not the Wald interval p_hat -/+ z sqrt(p_hat (1 - p_hat) / n), [0.450, 1.050] at 6/8
    assert wilson_interval(6, 8)[1] < 0.93 < 0.75 + 0.300
    assert all(math.isnan(x) for x in wilson_interval(0, 0))
    lo, hi = bootstrap_interval([0.0, 1.0] * 50, samples=2000, seed=1)
    assert lo < 0.5 < hi and hi - lo == pytest.approx(0.2, abs=0.05)
    assert bootstrap_interval([3.0] * 5) == (3.0, 3.0)
    mean, std = mean_std([40.0, 41.0, 45.0])
    assert mean == 42.0 and std == pytest.approx(math.sqrt(7))
    assert math.isnan(mean_std([1.0])[1])
