"""What a training batch holds, as the model and the losses read it.

Batches are dicts of tensors from ``sparsedoc.data.collate``: ``input_ids``, ``labels``, an
``attention_mask`` (padded rows) or ``position_ids`` (packed rows), and per token the index of
its record (``record_ids``, -1 for padding) with each record's label id (``record_label_ids``).
"""

from __future__ import annotations

import torch

MODEL_INPUTS = ("input_ids", "attention_mask", "labels", "position_ids")


def model_inputs(batch: dict[str, torch.Tensor]) -> dict:
    """The keys the HF model takes. Packed rows (with ``position_ids``) drop the padding mask so
    transformers builds a block-diagonal mask from the restarting positions.

    ``use_cache=False``: a training or loss forward never reuses keys and values, and transformers
    only derives the block-diagonal mask when no KV cache is passed (with the config's default
    ``use_cache=True`` it builds one, and packed records would attend to each other)."""
    inputs: dict = {k: batch[k] for k in MODEL_INPUTS if k in batch}
    if "position_ids" in inputs:
        inputs.pop("attention_mask", None)
    inputs["use_cache"] = False
    return inputs


def real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """bool (B, S): the tokens of real records. Padding and the rows that only fill an eval
    batch (``record_ids`` -1) are not; a batch without ``record_ids`` falls back to its mask."""
    if "record_ids" in batch:
        return batch["record_ids"] >= 0
    return batch["attention_mask"].bool()
