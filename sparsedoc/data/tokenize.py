"""Render records with the tokenizer's own chat template and keep loss on assistant tokens only.

Masking works on token boundaries the template itself produces: for every assistant turn we
render the conversation up to that turn with the generation prompt (the prompt the model sees
at inference) and up to the end of that turn; the tokens in between are the targets. This holds
for any template whose rendering of a prefix is a prefix of the full rendering (ChatML, Llama-3,
Mistral...), and we check that it does instead of assuming it.

Target-preserving truncation (``fit_chat``): a record longer than ``max_seq_len`` keeps its target
(the last assistant message) whole and loses turns of its prompt side instead. A *turn* is a whole
earlier exchange (user + assistant message) of a multi-turn chat, or a line of a message: the
dialogue converters (ACI-Bench, MTS-Dialog) write one speaker turn a line. The rule, applied until
the record fits:

1. drop whole earlier exchanges from the middle, keeping the first and the most recent ones;
2. then drop lines from the middle of the longest user message (the dialogue; an
   earlier assistant message is trained on, so it is never shortened), keeping its
   start (its first line and about a quarter of what is kept) and its most recent lines (always
   its last line, which in the converted sets holds the instruction);
3. only when that is not enough, because one turn is itself too long, cut tokens from the middle
   of the longest remaining line.

The system message is never shortened. A record whose target alone is longer than
``max_target_len`` (default ``max_seq_len``), or whose prompt cannot be made to fit, is skipped
and named with the reason in ``TokenizeStats.skipped``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from sparsedoc.data.schema import mcq_to_chat, record_kind, routing_label
from sparsedoc.errors import UserError

IGNORE_INDEX = -100
HEAD_SHARE = 0.25  # share of the kept prompt budget that goes to the start of a shortened turn list
MAX_CUTS = 20  # cuts inside one message before its record is skipped as unfittable


class TemplateError(UserError, ValueError):
    """The tokenizer has no chat template, or its template does not render prefixes as
    prefixes (masking would be wrong)."""


class PrefixMismatch(TemplateError):
    """One conversation renders a prefix that is not a prefix of the whole, usually because text
    at a reply's edge (leading whitespace) merges with the template's own tokens: that record is
    skipped with this reason. If the template itself is at fault every record is, and the run
    stops with the reason (``dataset.prepare_data``)."""


@dataclass
class TokenizedExample:
    input_ids: list[int]
    labels: list[int]
    label: str | None  # schema.routing_label: meta.label, else subject, else source
    record_id: str
    position_ids: list[int] | None = None  # set for packed rows: restarts at every record
    # Packed rows: each record's (label, length) in order, so every record keeps its own label.
    pieces: list[tuple[str | None, int]] | None = None
    filler: bool = False  # an eval row that only pads a batch to full size: not a record


@dataclass
class TokenizeStats:
    """What tokenizing a record list did: the data report of a run (``data_stats.json``)."""

    records: int = 0
    truncated: int = 0  # records whose prompt side was shortened (their target is whole)
    turns_dropped: int = 0  # whole turns removed, over all records (lines or whole messages)
    turns_cut: int = 0  # records in which one turn, too long by itself, was cut inside
    skipped: dict[str, str] = field(default_factory=dict)  # record id -> why it was skipped
    tokens: int = 0
    target_tokens: int = 0

    def as_dict(self) -> dict:
        return {"records": self.records, "truncated": self.truncated,
                "turns_dropped": self.turns_dropped, "turns_cut": self.turns_cut,
                "skipped": len(self.skipped), "tokens": self.tokens,
                "target_tokens": self.target_tokens}


def require_chat_template(tokenizer) -> None:
    """Training renders every record (MCQ ones too) with the tokenizer's chat template to find
    the assistant tokens; a tokenizer without one is refused here, naming the model."""
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            f"model.name_or_path={getattr(tokenizer, 'name_or_path', '?')}: its tokenizer has no "
            f"chat template (no chat_template.jinja, no 'chat_template' in "
            f"tokenizer_config.json); sparsedoc trains on chat-formatted records, so use an "
            f"instruct model's tokenizer or add a chat template to the model folder")


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = False,
             memo: dict | None = None) -> list[int]:
    """The chat template's rendering of ``messages``, as token ids.

    With ``memo`` (a dict kept for one record), the text is rendered and each distinct text is
    tokenized once: fitting a long record renders the same prefixes many times, and the
    tokenizer, not the template, is what costs (``tests/test_data.py`` checks the ids equal
    ``apply_chat_template(tokenize=True)``)."""
    if memo is None:
        out = tokenizer.apply_chat_template(messages, tokenize=True,
                                            add_generation_prompt=add_generation_prompt)
        if isinstance(out, dict) or hasattr(out, "keys"):  # transformers >= 5: a BatchEncoding
            out = out["input_ids"]
        return list(out)
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)
    if text not in memo:
        memo[text] = tokenizer(text, add_special_tokens=False)["input_ids"]
    return memo[text]


def encode_chat(tokenizer, messages: list[dict], system_prompt: str = "",
                memo: dict | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation; labels are -100 outside assistant turns."""
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    full = chat_ids(tokenizer, messages, False, memo)
    labels = [IGNORE_INDEX] * len(full)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start_ids = chat_ids(tokenizer, messages[:i], True, memo)
        end_ids = chat_ids(tokenizer, messages[: i + 1], False, memo)
        if full[: len(start_ids)] != start_ids or full[: len(end_ids)] != end_ids:
            edge = msg["content"][:1]
            hint = (f"its text starts with {edge!r}, which merges with the template's tokens"
                    if edge.isspace() else "the chat template may not render prefixes as prefixes")
            raise PrefixMismatch(
                f"message {i} (assistant): the conversation up to this reply does not tokenize "
                f"as a prefix of the whole ({hint}), so its tokens cannot be located safely")
        labels[len(start_ids): len(end_ids)] = full[len(start_ids): len(end_ids)]
    return full, labels


def target_ids(tokenizer, messages: list[dict], memo: dict | None = None) -> list[int]:
    """The target's tokens: the last assistant message as the template renders it (from the
    generation prompt to its end of turn)."""
    t = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    whole = chat_ids(tokenizer, messages[: t + 1], False, memo)
    return whole[len(chat_ids(tokenizer, messages[:t], True, memo)):]


@dataclass
class Fitted:
    """One record fitted to the row length: ids and labels, or the reason it was skipped."""

    input_ids: list[int]
    labels: list[int]
    turns_dropped: int = 0
    turn_cut: bool = False
    skip: str = ""  # non-empty: the record does not fit and is left out, for this reason

    @property
    def shortened(self) -> bool:
        return self.turns_dropped > 0 or self.turn_cut


def _keep_ends(costs: list[int], drop: int) -> list[int]:
    """Indices of the units kept when at least ``drop`` cost must go from the middle: the first
    and last unit always stay, then the start gets up to ``HEAD_SHARE`` of the kept budget, the
    end (the most recent units) as much of the rest as fits, and any leftover goes to the start."""
    n = len(costs)
    if n <= 2:
        return list(range(n))
    budget = sum(costs) - drop
    head, tail = [0], [n - 1]
    used, head_cost = costs[0] + costs[-1], costs[0]
    i, j = 1, n - 2  # the next candidates from the start and from the end

    def fits(k: int) -> bool:
        return used + costs[k] <= budget

    while i <= j and fits(i) and head_cost + costs[i] <= HEAD_SHARE * budget:
        head.append(i)
        used, head_cost, i = used + costs[i], head_cost + costs[i], i + 1
    while j >= i and fits(j):
        tail.append(j)
        used, j = used + costs[j], j - 1
    while i <= j and fits(i):  # leftover budget goes back to the start
        head.append(i)
        used, i = used + costs[i], i + 1
    return head + tail[::-1]


def _costs(tokenizer, texts: list[str]) -> list[int]:
    if not texts:
        return []
    return [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _line_costs(tokenizer, text: str) -> list[int]:
    """Tokens of each line of ``text`` as it is tokenized whole (a token belongs to the line it
    starts in); tokenizing lines one by one would miscount the merges across line breaks."""
    lines = text.split("\n")
    if not getattr(tokenizer, "is_fast", False):
        return _costs(tokenizer, [ln + "\n" for ln in lines])
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)[
        "offset_mapping"]
    ends, pos = [], 0
    for ln in lines:
        pos += len(ln) + 1
        ends.append(pos)  # the line's text and its "\n"
    costs, i = [0] * len(lines), 0
    for start, _ in offsets:
        while i < len(lines) - 1 and start >= ends[i]:
            i += 1
        costs[i] += 1
    return costs


def _cut_middle(tokenizer, text: str, drop: int) -> str:
    """``text`` without ``drop`` tokens from its middle (its start and end stay)."""
    toks = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = max(0, len(toks) - drop)
    head = int(keep * HEAD_SHARE)
    tail = toks[len(toks) - (keep - head):] if keep - head else []
    return tokenizer.decode(toks[:head]) + tokenizer.decode(tail)


@dataclass
class Shortened:
    """A conversation whose prompt side was shortened to fit: the messages, their encoding (what
    ``encode`` returned for them, the ids first) and what was shortened."""

    messages: list[dict]
    encoded: tuple
    turns_dropped: int = 0
    turn_cut: bool = False
    over: int = 0  # tokens still over the limit (> 0: the prompt side could not be made to fit)


def shorten_prompt(tokenizer, messages: list[dict], last_prompt: int, limit: int,
                   encode: Callable[[list[dict]], tuple]) -> Shortened:
    """Shorten the prompt side of ``messages`` (through index ``last_prompt``, the final user
    message) by the rule in this module's docstring until ``encode(messages)[0]`` has at most
    ``limit`` ids. Messages after ``last_prompt`` (the target, in training) are never touched.
    Training (``fit_chat``) and evaluation prompts (``eval.generation``) share it."""
    msgs = [dict(m) for m in messages]
    first = 1 if msgs and msgs[0]["role"] == "system" else 0
    enc = encode(msgs)
    dropped = 0

    def over() -> int:
        return len(enc[0]) - limit

    # 1. whole earlier exchanges, as (user, assistant) pairs so that roles keep alternating
    pairs = [(i, i + 1) for i in range(first, last_prompt - 1, 2)]
    if (over() > 0 and len(pairs) >= 3 and (last_prompt - first) % 2 == 0
            and all(msgs[a]["role"] == "user" and msgs[b]["role"] == "assistant" for a, b in pairs)):
        costs = [sum(_costs(tokenizer, [msgs[a]["content"], msgs[b]["content"]])) for a, b in pairs]
        base, need = msgs, over()
        while True:
            keep = _keep_ends(costs, need)
            gone = {k for p in range(len(pairs)) if p not in keep for k in pairs[p]}
            msgs = [m for k, m in enumerate(base) if k not in gone]
            enc = encode(msgs)
            if over() <= 0 or len(keep) == 2:
                break
            need += over()
        dropped += len(gone)
        last_prompt -= len(gone)
    # 2. lines from the middle of each prompt message, the longest first. Earlier assistant
    # messages stay as they are: they are labelled too, and a shortened answer would be trained on
    prompt_side = sorted((k for k in range(first, last_prompt + 1)
                          if msgs[k]["role"] != "assistant"), key=lambda k: -len(msgs[k]["content"]))
    for k in prompt_side:
        lines = msgs[k]["content"].split("\n")
        if over() <= 0 or len(lines) < 3:
            continue
        costs, need = _line_costs(tokenizer, msgs[k]["content"]), over()
        while True:
            keep = _keep_ends(costs, need)
            msgs[k] = {**msgs[k], "content": "\n".join(lines[i] for i in keep)}
            enc = encode(msgs)
            if over() <= 0 or len(keep) == 2:
                break
            need += over()
        dropped += len(lines) - len(keep)
    # 3. a single turn too long by itself: cut the middle of the longest remaining line
    cut = False
    for k in prompt_side:
        for _ in range(MAX_CUTS):  # decoding a cut line and re-encoding it need not shrink it
            if over() <= 0 or not msgs[k]["content"]:
                break
            lines = msgs[k]["content"].split("\n")
            i = max(range(len(lines)), key=lambda i: len(lines[i]))
            lines[i] = _cut_middle(tokenizer, lines[i], over())
            msgs[k] = {**msgs[k], "content": "\n".join(lines)}
            enc = encode(msgs)
            cut = True
            if not any(lines):
                break
    return Shortened(msgs, enc, dropped, cut, max(0, over()))


def fit_chat(tokenizer, messages: list[dict], max_seq_len: int, max_target_len: int = 0,
             system_prompt: str = "") -> Fitted:
    """Encode one conversation within ``max_seq_len`` tokens, shortening the prompt side by the
    rule in this module's docstring and never the target (the last assistant message). A
    conversation whose replies cannot be located in its tokens is skipped with the reason."""
    try:
        return _fit_chat(tokenizer, messages, max_seq_len, max_target_len, system_prompt)
    except PrefixMismatch as e:
        return Fitted([], [], skip=str(e))


def _fit_chat(tokenizer, messages: list[dict], max_seq_len: int, max_target_len: int,
              system_prompt: str) -> Fitted:
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    msgs = [dict(m) for m in messages]
    memo: dict = {}  # each distinct rendering of this record is tokenized once
    ids, labels = encode_chat(tokenizer, msgs, memo=memo)
    if len(ids) <= max_seq_len and not max_target_len:
        return Fitted(ids, labels)
    t = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    target = target_ids(tokenizer, msgs, memo)
    cap = max_target_len or max_seq_len
    if len(target) > cap:
        which = "max_target_len" if max_target_len else "max_seq_len"
        return Fitted([], [], skip=f"target of {len(target)} tokens exceeds {which}={cap}")
    if len(ids) <= max_seq_len:
        return Fitted(ids, labels)
    dropped = len(msgs) - t - 1  # messages after the target carry no loss: they go first
    fit = shorten_prompt(tokenizer, msgs[: t + 1], t - 1, max_seq_len,
                         lambda m: encode_chat(tokenizer, m, memo=memo))
    ids, labels = fit.encoded
    dropped += fit.turns_dropped
    if fit.over:
        return Fitted([], [], dropped, fit.turn_cut, skip=f"prompt side does not fit beside the "
                      f"{len(target)}-token target: {len(ids)} tokens with every turn shortened")
    if ids[len(ids) - len(target):] != target:  # a bug here would train on a changed note
        raise AssertionError("the target changed while its prompt was shortened")
    return Fitted(ids, labels, dropped, fit.turn_cut)


def to_chat(record: dict, mcq_with_explanation: bool = True) -> dict:
    """Chat records pass through; MCQ records become instruction records (answer + explanation)."""
    kind = record_kind(record)
    if kind == "mcq":
        return mcq_to_chat(record, with_explanation=mcq_with_explanation)
    return record


def source_and_target(chat: dict) -> tuple[str, str]:
    """An encoder-decoder model's (source, target) texts of a chat record: the user messages
    before the last assistant message, joined by a blank line, and that message. A system
    message is an instruction for chat models; seq2seq models get ``data.source_prefix``."""
    msgs = chat["messages"]
    t = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return "\n\n".join(m["content"] for m in msgs[:t] if m["role"] == "user"), msgs[t]["content"]


def encode_seq2seq(tokenizer, source: str, target: str, source_prefix: str, max_source_len: int,
                   max_target_len: int) -> Fitted:
    """Encoder ids of ``source_prefix + source`` (the tokenizer's special tokens, cut to
    ``max_source_len`` by the tokenizer's own truncation) and decoder labels: the target's ids
    and EOS, every one trained on. A target longer than ``max_target_len`` is skipped, not cut:
    a shortened summary would teach the model to stop early."""
    if tokenizer.eos_token_id is None:
        raise TemplateError(f"model.name_or_path={getattr(tokenizer, 'name_or_path', '?')}: its "
                            f"tokenizer has no EOS token; a seq2seq target needs one to end")
    labels = tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    if len(labels) > max_target_len:
        return Fitted([], [], skip=f"target of {len(labels)} tokens exceeds "
                      f"max_target_len={max_target_len}")
    text = source_prefix + source
    ids = tokenizer(text)["input_ids"]
    cut = len(ids) > max_source_len
    if cut:
        ids = tokenizer(text, truncation=True, max_length=max_source_len)["input_ids"]
    return Fitted(ids, labels, turn_cut=cut)


def tokenize_seq2seq(records: list[dict], tokenizer, max_source_len: int, max_target_len: int,
                     source_prefix: str = "", mcq_with_explanation: bool = True
                     ) -> tuple[list[TokenizedExample], TokenizeStats]:
    """``tokenize_records`` for encoder-decoder models: no chat template, the encoder reads the
    prompt side as plain text and the decoder's labels are the whole target
    (``encode_seq2seq``). A cut source is counted in ``truncated`` and ``turns_cut``."""
    stats = TokenizeStats()
    out: list[TokenizedExample] = []
    for rec in records:
        stats.records += 1
        chat = to_chat(rec, mcq_with_explanation)
        fit = encode_seq2seq(tokenizer, *source_and_target(chat), source_prefix, max_source_len,
                             max_target_len)
        if fit.skip:
            stats.skipped[rec["id"]] = fit.skip
            continue
        stats.truncated += fit.shortened
        stats.turns_cut += fit.turn_cut
        stats.tokens += len(fit.input_ids) + len(fit.labels)
        stats.target_tokens += len(fit.labels)
        out.append(TokenizedExample(fit.input_ids, fit.labels, routing_label(chat), rec["id"]))
    return out, stats


def tokenize_records(records: list[dict], tokenizer, max_seq_len: int, system_prompt: str = "",
                     mcq_with_explanation: bool = True, progress: bool = False,
                     max_target_len: int = 0) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize and mask a list of records within ``max_seq_len`` (``fit_chat``: the target
    stays whole, the prompt loses turns); shortened records are counted, and records that
    cannot fit are skipped and listed with the reason (never silently dropped)."""
    from tqdm.auto import tqdm

    require_chat_template(tokenizer)
    stats = TokenizeStats()
    out: list[TokenizedExample] = []
    for rec in tqdm(records, desc="tokenize", disable=not progress, leave=False):
        stats.records += 1
        chat = to_chat(rec, mcq_with_explanation)
        fit = fit_chat(tokenizer, chat["messages"], max_seq_len, max_target_len, system_prompt)
        n_target = sum(1 for x in fit.labels[1:] if x != IGNORE_INDEX)  # label 0 is never predicted
        if fit.skip or n_target == 0:
            stats.skipped[rec["id"]] = fit.skip or "no target token"
            continue
        stats.truncated += fit.shortened
        stats.turns_dropped += fit.turns_dropped
        stats.turns_cut += fit.turn_cut
        stats.tokens += len(fit.input_ids)
        stats.target_tokens += n_target
        out.append(TokenizedExample(fit.input_ids, fit.labels, routing_label(chat), rec["id"]))
    return out, stats
