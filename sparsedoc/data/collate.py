"""Batching: pad to the longest row, or pack several examples into full rows.

Every batch carries ``labels`` (-100 outside targets) and the record layout the routing losses
and analyses read:

* ``record_ids`` (B, S): index of each token's record within the batch, -1 on padding and on
  filler rows; a packed row holds several records.
* ``record_label_ids`` (R,): each record's ``meta.label`` as an index into the run's label
  vocabulary, -1 when unknown.
"""

from __future__ import annotations

import torch

from sparsedoc.data.tokenize import IGNORE_INDEX, TokenizedExample


class PadCollator:
    """Right-pad a list of examples into a batch; padding is masked out of attention and loss."""

    def __init__(self, pad_token_id: int, label_vocab: dict[str, int] | None = None,
                 pad_to_multiple_of: int = 8):
        self.pad_token_id = pad_token_id
        self.label_vocab = label_vocab or {}
        self.multiple = pad_to_multiple_of

    def __call__(self, examples: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        longest = max(len(e.input_ids) for e in examples)
        width = -(-longest // self.multiple) * self.multiple  # tensor-core friendly
        n = len(examples)
        input_ids = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((n, width), dtype=torch.long)
        record_ids = torch.full((n, width), -1, dtype=torch.long)
        record_labels: list[int] = []
        for i, e in enumerate(examples):
            length = len(e.input_ids)
            input_ids[i, :length] = torch.tensor(e.input_ids)
            labels[i, :length] = torch.tensor(e.labels)
            attention_mask[i, :length] = 1
            if e.filler:
                continue
            start = 0
            for label, piece_len in e.pieces or [(e.label, length)]:
                record_ids[i, start:start + piece_len] = len(record_labels)
                record_labels.append(self.label_vocab.get(label, -1))
                start += piece_len
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                "record_ids": record_ids,
                "record_label_ids": torch.tensor(record_labels, dtype=torch.long)}


class Seq2SeqCollator(PadCollator):
    """Encoder-decoder batches: encoder ids right-padded (``attention_mask``), labels padded
    on their own with -100, as transformers' ``DataCollatorForSeq2Seq`` pads them; the model
    builds its decoder inputs by shifting the labels right. ``record_ids`` cover the encoder
    tokens (one record a row)."""

    def __call__(self, examples: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        batch = super().__call__(
            [TokenizedExample(e.input_ids, [IGNORE_INDEX] * len(e.input_ids), e.label,
                              e.record_id, filler=e.filler) for e in examples])
        longest = max(len(e.labels) for e in examples)
        width = -(-longest // self.multiple) * self.multiple
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            labels[i, :len(e.labels)] = torch.tensor(e.labels)
        batch["labels"] = labels
        return batch


def pack_examples(examples: list[TokenizedExample], max_seq_len: int) -> list[TokenizedExample]:
    """Greedily concatenate examples (in order) into rows of at most ``max_seq_len`` tokens.

    A record is never split across rows: tokenization already fitted each one to
    ``max_seq_len`` with its target whole, and a longer example here is an error.
    The first label of each packed piece is masked so no row learns to predict across a record
    boundary. Attention still spans the whole row unless the model runs flash-attention-2 with
    ``position_ids`` restarting per piece (``PackCollator`` provides them). Each record keeps
    its own routing label (``pieces``).
    """
    rows: list[TokenizedExample] = []
    cur_ids: list[int] = []
    cur_labels: list[int] = []
    cur_pos: list[int] = []
    pieces: list[TokenizedExample] = []
    for e in examples:
        if len(e.input_ids) > max_seq_len:
            raise ValueError(f"record {e.record_id}: {len(e.input_ids)} tokens do not fit a packed "
                             f"row of {max_seq_len}; records are never split across rows")
        if cur_ids and len(cur_ids) + len(e.input_ids) > max_seq_len:
            rows.append(_packed_row(cur_ids, cur_labels, cur_pos, pieces))
            cur_ids, cur_labels, cur_pos, pieces = [], [], [], []
        pieces.append(e)
        cur_ids += e.input_ids
        cur_labels += [IGNORE_INDEX] + e.labels[1:]
        cur_pos += list(range(len(e.input_ids)))
    if cur_ids:
        rows.append(_packed_row(cur_ids, cur_labels, cur_pos, pieces))
    return rows


def _packed_row(ids, labels, pos, pieces: list[TokenizedExample]) -> TokenizedExample:
    return TokenizedExample(ids, labels, pieces[0].label, pieces[0].record_id, position_ids=pos,
                            pieces=[(p.label, len(p.input_ids)) for p in pieces])


class PackCollator(PadCollator):
    """Pad packed rows and add ``position_ids`` that restart at every packed record."""

    def __call__(self, examples: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        batch = super().__call__(examples)
        pos = torch.zeros_like(batch["input_ids"])
        for i, e in enumerate(examples):
            p = e.position_ids or list(range(len(e.input_ids)))
            pos[i, : len(p)] = torch.tensor(p)
        batch["position_ids"] = pos
        return batch
