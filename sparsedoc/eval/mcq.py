"""Multiple-choice accuracy (CMExam, CMB-Exam, CMMLU medical subjects, MedQA, PubMedQA).

Two scorers over the same prompts:

* ``loglik``: the log-likelihood of each option's answer after the prompt, highest wins (the
  CMMLU / lm-eval convention; no generation). Continuations are the option letter (``"A"`` after
  ``答案：``, ``" A"`` after ``Answer:``) or, for items asked as text (PubMedQA), the option text
  (``" yes"``). A single forward per batch when every continuation is one token.
* ``generate``: greedy generation, then ``parse.parse_choice``. Outputs it cannot read are counted
  as ``unparsed`` and scored wrong, never guessed.

Prompts: ``chat`` renders the item exactly as training renders an MCQ record
(``schema.mcq_to_chat``: question, options, instruction) through the chat template, with k-shot
examples as earlier user/assistant turns; ``loglik`` then appends the answer prefix the training
target starts with (``答案：`` / ``Answer:``). ``plain`` is the CMMLU text prompt (subject header,
``question / A. ... / 答案：``), shots included.

Multi-answer items (CMExam has some) are right only when the predicted letter set equals the
gold set; ``loglik`` picks one letter, so it cannot get them right, and their number is reported.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsedoc.data.schema import mcq_to_chat, record_kind
from sparsedoc.eval.parse import parse_choice
from sparsedoc.eval.prompts import encode, encode_continuation, render_chat
from sparsedoc.eval.stats import wilson_interval

CLOSED_ANSWERS = ("yes", "no", "maybe")  # PubMedQA: chat records with meta.answer
ANSWER_PREFIX = {"zh": "答案：", "en": "Answer:"}


@dataclass
class MCQItem:
    """One multiple-choice item, from an MCQ record or a yes/no/maybe QA record."""

    id: str
    question: str
    options: dict[str, str]
    answer: str  # sorted letters
    subject: str
    lang: str
    text_choices: bool = False  # asked as text (no letters shown); answered by option text
    record: dict | None = None

    @property
    def letters(self) -> str:
        return "".join(self.options)


def is_closed_qa(record: dict) -> bool:
    """A chat record whose answer is one of yes / no / maybe (PubMedQA's converter output)."""
    return (record_kind(record) == "chat"
            and str(record.get("meta", {}).get("answer", "")).lower() in CLOSED_ANSWERS)


def mcq_item(record: dict) -> MCQItem:
    """An ``MCQItem`` from an MCQ record, or from a yes/no/maybe chat record: its last user
    message is the question (the converter's instruction included) and the options are the
    three answers, asked and answered as text."""
    meta = record.get("meta", {})
    if record_kind(record) == "mcq":
        return MCQItem(record["id"], record["question"], dict(record["options"]),
                       record["answer"], meta.get("subject", ""), meta.get("lang", "en"),
                       record=record)
    if not is_closed_qa(record):
        raise ValueError(f"record {record.get('id')}: neither an MCQ record nor a yes/no/maybe "
                         f"QA record")
    users = [m["content"] for m in record["messages"] if m["role"] == "user"]
    options = {"A": "yes", "B": "no", "C": "maybe"}
    letter = "ABC"[CLOSED_ANSWERS.index(meta["answer"].lower())]
    return MCQItem(record["id"], users[-1], options, letter,
                   meta.get("label") or meta.get("subject") or meta.get("source", ""),
                   meta.get("lang", "en"), text_choices=True, record=record)


# ---- prompts ----------------------------------------------------------------------------------


def _lang(item: MCQItem) -> str:
    return "zh" if item.lang == "zh" else "en"


def continuation(item: MCQItem, letter: str) -> str:
    """What the model should write after the answer prefix to pick ``letter``."""
    if item.text_choices:
        return " " + item.options[letter]
    return letter if _lang(item) == "zh" else " " + letter


def _answer_text(item: MCQItem) -> str:
    """The short answer of a shot: the training target's first line ("答案：B")."""
    if item.text_choices:
        return ANSWER_PREFIX["en"] + continuation(item, item.answer)
    return mcq_to_chat(item.record, with_explanation=False)["messages"][1]["content"]


def _user_text(item: MCQItem) -> str:
    if item.text_choices:
        return item.question
    return mcq_to_chat(item.record, with_explanation=False)["messages"][0]["content"]


def _subject_header(item: MCQItem) -> str:
    if item.text_choices:
        return ""
    meta = (item.record or {}).get("meta", {})
    if _lang(item) == "zh":
        subj = meta.get("subject_zh") or item.subject
        return f"以下是关于{subj}的单项选择题，请直接给出正确答案的选项。\n\n" if subj else \
            "以下是单项选择题，请直接给出正确答案的选项。\n\n"
    subj = item.subject.replace("_", " ")
    return f"The following are multiple choice questions (with answers) about {subj}.\n\n"


def _plain_block(item: MCQItem) -> str:
    prefix = ANSWER_PREFIX[_lang(item)]
    if item.text_choices:
        return f"{item.question}\n{ANSWER_PREFIX['en']}"
    opts = "\n".join(f"{k}. {v}" for k, v in item.options.items())
    return f"{item.question}\n{opts}\n{prefix}"


def build_prompt(item: MCQItem, shots: list[MCQItem], tokenizer, fmt: str,
                 scorer: str, system_prompt: str = "") -> str:
    """The prompt text for one item; ``scorer`` is "loglik" (ends with the answer prefix) or
    "generate" (chat: ends at the assistant header; plain: at the answer prefix)."""
    if fmt == "plain":
        text = _subject_header(item)
        for s in shots:
            text += _plain_block(s) + "".join(continuation(s, c) for c in s.answer) + "\n\n"
        return text + _plain_block(item)
    messages = []
    for s in shots:
        messages += [{"role": "user", "content": _user_text(s)},
                     {"role": "assistant", "content": _answer_text(s)}]
    messages.append({"role": "user", "content": _user_text(item)})
    text = render_chat(tokenizer, messages, system_prompt)
    if scorer == "loglik":
        text += ANSWER_PREFIX["en"] if item.text_choices else ANSWER_PREFIX[_lang(item)]
    return text


def select_shots(item: MCQItem, pool: list[MCQItem], k: int) -> list[MCQItem]:
    """The first k pool items of the same subject (the CMMLU / MMLU convention), topped up with
    other subjects' when the subject has fewer; the item itself is never its own shot."""
    if k == 0:
        return []
    same = [p for p in pool if p.subject == item.subject and p.id != item.id]
    other = [p for p in pool if p.subject != item.subject and p.id != item.id]
    return (same + other)[:k]


# ---- scorers ----------------------------------------------------------------------------------


def continuation_ids(tokenizer, prompt: str, item: MCQItem, chat: bool) -> dict[str, list[int]]:
    return {c: encode_continuation(tokenizer, prompt, continuation(item, c), chat)
            for c in item.letters}


@torch.no_grad()
def _logprobs_at(model, sequences: list[list[int]], positions: list[list[int]],
                 virtual_tokens: int = 0) -> list[torch.Tensor]:
    """Next-token log-probs ``(len(positions[i]), V)`` at the given positions of each sequence,
    from one right-padded forward that computes only the logits needed (``logits_to_keep``), so
    memory does not grow with vocabulary x sequence length. ``virtual_tokens``: a soft prompt the
    model prepends (its logits come first)."""
    dev = next(model.parameters()).device
    n, width = len(sequences), max(len(s) for s in sequences)
    ids = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    need = sorted({p for ps in positions for p in ps})
    col = {p: j for j, p in enumerate(need)}
    keep = (torch.tensor(need, dtype=torch.long) + virtual_tokens).to(dev)
    try:
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                       logits_to_keep=keep).logits  # (n, K, V)
    except TypeError:  # a model without logits_to_keep: full logits, then select
        logits = model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits[:, keep]
    return [torch.log_softmax(logits[i, [col[p] for p in ps]].float(), dim=-1).cpu()
            for i, ps in enumerate(positions)]


def sequence_logprobs(model, sequences: list[list[int]], starts: list[int],
                      virtual_tokens: int = 0, chunk: int = 8) -> list[float]:
    """Sum of log p(token) over ``seq[start:]`` for each sequence (position p predicts token
    p + 1), ``chunk`` sequences per forward."""
    out: list[float] = []
    for c in range(0, len(sequences), chunk):
        seqs, sts = sequences[c:c + chunk], starts[c:c + chunk]
        logp = _logprobs_at(model, seqs, [list(range(st - 1, len(s) - 1))
                                          for s, st in zip(seqs, sts)], virtual_tokens)
        out += [float(lp[torch.arange(len(s) - st), torch.tensor(s[st:])].sum())
                for lp, s, st in zip(logp, seqs, sts)]
    return out


def loglik_scores(model, prompts: list[list[int]], conts: list[dict[str, list[int]]],
                  virtual_tokens: int = 0) -> list[dict[str, float]]:
    """Log-likelihood of every option's continuation, for a batch of items."""
    if all(len(ids) == 1 for c in conts for ids in c.values()):
        # one token per option: the prompt's last position scores every option at once
        logp = _logprobs_at(model, prompts, [[len(p) - 1] for p in prompts], virtual_tokens)
        return [{letter: float(lp[0, ids[0]]) for letter, ids in c.items()}
                for lp, c in zip(logp, conts)]
    seqs, starts, where = [], [], []
    for i, (p, c) in enumerate(zip(prompts, conts)):
        for letter, ids in c.items():
            seqs.append(p + ids)
            starts.append(len(p))
            where.append((i, letter))
    scores = sequence_logprobs(model, seqs, starts, virtual_tokens)
    out: list[dict[str, float]] = [{} for _ in prompts]
    for (i, letter), s in zip(where, scores):
        out[i][letter] = s
    return out


def loglik_prediction(item: MCQItem, scores: dict[str, float]) -> dict:
    pred = max(scores, key=lambda k: (scores[k], -ord(k)))  # ties: the earlier letter
    return {"pred": pred, "correct": pred == item.answer,
            "logprobs": {k: round(v, 6) for k, v in scores.items()}}


def generate_prediction(item: MCQItem, output: str) -> dict:
    pred = parse_choice(output, item.letters, item.options, accept_letters=not item.text_choices)
    return {"pred": pred, "correct": pred == item.answer, "parsed": pred is not None,
            "output": output}


# ---- summaries --------------------------------------------------------------------------------


def _acc(correct: int, n: int) -> dict:
    lo, hi = wilson_interval(correct, n)
    return {"n": n, "correct": correct, "accuracy": 100 * correct / n if n else float("nan"),
            "ci95": [100 * lo, 100 * hi]}


def summarize(items: list[MCQItem], preds: list[dict], scorer: str) -> dict:
    """Overall and per-subject accuracy (percent) with 95% Wilson intervals and item counts."""
    out = _acc(sum(p["correct"] for p in preds), len(preds))
    subjects: dict[str, list[bool]] = {}
    for it, p in zip(items, preds):
        subjects.setdefault(it.subject or "-", []).append(p["correct"])
    out["per_subject"] = {s: _acc(sum(v), len(v)) for s, v in sorted(subjects.items())}
    out["n_multi_answer"] = sum(len(it.answer) > 1 for it in items)
    if scorer == "generate":
        unparsed = sum(not p["parsed"] for p in preds)
        parsed = len(preds) - unparsed
        out["unparsed"] = unparsed
        out["unparsed_pct"] = 100 * unparsed / len(preds) if preds else float("nan")
        out["accuracy_parsed"] = (100 * sum(p["correct"] for p in preds) / parsed
                                  if parsed else float("nan"))
    return out


# ---- the scoring loop -------------------------------------------------------------------------


def score_mcq(model, tokenizer, items: list[MCQItem], scorer: str, cfg, pool: list[MCQItem] = (),
              cache=None, progress: bool = False) -> tuple[list[dict], dict]:
    """Score ``items`` with ``scorer`` ("loglik" or "generate") under the prompt settings of
    ``cfg`` (an ``EvalCfg``); returns per-item predictions (item order) and run statistics
    (prompts truncated, predictions reused from ``cache``)."""
    from sparsedoc.eval.cache import run_batched
    from sparsedoc.eval.generation import generate, generation_config
    from sparsedoc.loader import prompt_virtual_tokens
    from sparsedoc.eval.prompts import prompt_budget, truncate_left

    chat = cfg.prompt_format == "chat"
    budget = prompt_budget(model, cfg.max_prompt_tokens, cfg.mcq_max_new_tokens)
    texts = [build_prompt(it, select_shots(it, list(pool), cfg.num_fewshot), tokenizer,
                          cfg.prompt_format, scorer, cfg.system_prompt) for it in items]
    prompts, truncated = [], 0
    for t in texts:
        ids, cut = truncate_left(encode(tokenizer, t, chat), budget)
        prompts.append(ids)
        truncated += cut
    if scorer == "loglik":
        conts = [continuation_ids(tokenizer, t, it, chat) for t, it in zip(texts, items)]
        virtual = prompt_virtual_tokens(model)

        def fn(idx: list[int]) -> list[dict]:
            scores = loglik_scores(model, [prompts[i] for i in idx], [conts[i] for i in idx],
                                   virtual)
            return [loglik_prediction(items[i], s) for i, s in zip(idx, scores)]
    elif scorer == "generate":
        gc = generation_config(model, tokenizer, cfg.mcq_max_new_tokens, cfg.greedy)

        def fn(idx: list[int]) -> list[dict]:
            outs = generate(model, tokenizer, [prompts[i] for i in idx], gc)
            return [generate_prediction(items[i], o["text"]) for i, o in zip(idx, outs)]
    else:
        raise ValueError(f"unknown MCQ scorer {scorer!r}; expected loglik or generate")
    preds, reused = run_batched([it.id for it in items], [len(p) for p in prompts], fn,
                                cfg.batch_size, cache, desc=scorer, progress=progress)
    return preds, {"truncated_prompts": truncated, "cached": reused}
