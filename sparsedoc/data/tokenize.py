"""Render records with the tokenizer's own chat template and keep loss on assistant tokens only.

Masking works on token boundaries the template itself produces: for every assistant turn we
render the conversation up to that turn with the generation prompt (the prompt the model sees
at inference) and up to the end of that turn; the tokens in between are the targets. This holds
for any template whose rendering of a prefix is a prefix of the full rendering (ChatML, Llama-3,
Mistral...), and we check that it does instead of assuming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sparsedoc.data.schema import mcq_to_chat, record_kind, routing_label

IGNORE_INDEX = -100


class TemplateError(ValueError):
    """The chat template does not render prefixes as prefixes; masking would be wrong."""


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
    records: int = 0
    truncated: int = 0
    skipped_no_target: list[str] = field(default_factory=list)  # ids with no answer token left
    tokens: int = 0
    target_tokens: int = 0

    def as_dict(self) -> dict:
        return {"records": self.records, "truncated": self.truncated,
                "skipped_no_target": len(self.skipped_no_target), "tokens": self.tokens,
                "target_tokens": self.target_tokens}


def _ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True,
                                        add_generation_prompt=add_generation_prompt)
    if isinstance(out, dict) or hasattr(out, "keys"):  # transformers >= 5 returns a BatchEncoding
        out = out["input_ids"]
    return list(out)


def encode_chat(tokenizer, messages: list[dict], system_prompt: str = "") -> tuple[list[int], list[int]]:
    """Token ids and labels for one conversation; labels are -100 outside assistant turns."""
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    full = _ids(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(full)
    for i, msg in enumerate(messages):
        if msg["role"] != "assistant":
            continue
        start_ids = _ids(tokenizer, messages[:i], add_generation_prompt=True)
        end_ids = _ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(start_ids)] != start_ids or full[: len(end_ids)] != end_ids:
            raise TemplateError(
                "the tokenizer's chat template does not render a conversation prefix as a prefix "
                "of the whole conversation, so assistant tokens cannot be located safely")
        labels[len(start_ids): len(end_ids)] = full[len(start_ids): len(end_ids)]
    return full, labels


def to_chat(record: dict, mcq_with_explanation: bool = True) -> dict:
    """Chat records pass through; MCQ records become instruction records (answer + explanation)."""
    kind = record_kind(record)
    if kind == "mcq":
        return mcq_to_chat(record, with_explanation=mcq_with_explanation)
    return record


def tokenize_records(records: list[dict], tokenizer, max_seq_len: int, system_prompt: str = "",
                     mcq_with_explanation: bool = True, progress: bool = False
                     ) -> tuple[list[TokenizedExample], TokenizeStats]:
    """Tokenize and mask a list of records; truncation is counted, and records left with no
    target token after truncation are skipped and listed (never silently dropped)."""
    from tqdm.auto import tqdm

    stats = TokenizeStats()
    out: list[TokenizedExample] = []
    for rec in tqdm(records, desc="tokenize", disable=not progress, leave=False):
        stats.records += 1
        chat = to_chat(rec, mcq_with_explanation)
        ids, labels = encode_chat(tokenizer, chat["messages"], system_prompt)
        if len(ids) > max_seq_len:
            stats.truncated += 1
            ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        n_target = sum(1 for t in labels[1:] if t != IGNORE_INDEX)  # label 0 is never predicted
        if n_target == 0:
            stats.skipped_no_target.append(rec["id"])
            continue
        stats.tokens += len(ids)
        stats.target_tokens += n_target
        out.append(TokenizedExample(ids, labels, routing_label(chat), rec["id"]))
    return out, stats
