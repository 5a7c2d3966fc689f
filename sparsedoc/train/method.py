"""What differs between training methods, in one small interface the shared loop calls.

A method builds its adapter on the base model, turns a batch into a loss (plus metrics), may act
after each optimizer step (the MoE enqueues into its memory queue there), and writes its
adapter-only weights. Everything else — data, DeepSpeed, logging, checkpoints — is the loop's.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sparsedoc.config import Config

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


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitioned params report their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


class Method:
    """Base class: full-model defaults that the adapter methods override."""

    name = "base"
    exclude_frozen_in_checkpoint = True  # the frozen base is reloaded from its source on resume
    calibration_batches = 0  # micro-batches per rank handed to ``calibrate`` (0: not called)

    def build(self, model: nn.Module, cfg: Config) -> nn.Module:
        raise NotImplementedError

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """The optimizer's parameter groups: every trainable parameter at ``lr``."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    def compute_loss(self, model, batch: dict[str, torch.Tensor], step: int
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        """``model`` runs the forward: the DeepSpeed engine in training, a bare model in tests."""
        out = model(**model_inputs(batch))
        return out.loss, {}

    def calibrate(self, model, batches: list[dict[str, torch.Tensor]]) -> None:
        """Called once on every rank before the first step of a fresh (not resumed) run, with
        a few training batches already on the device; data-dependent initialisation goes here."""

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called on every rank after each optimizer step, under no_grad."""

    def step_metrics(self, model: nn.Module, step: int) -> dict[str, float]:
        """Extra metrics for the logging step (rank 0 logs them)."""
        return {}

    def write_adapter(self, model: nn.Module, out_dir: Path) -> None:
        """Write adapter-only weights on rank 0; parameters are already gathered (ZeRO-3)."""

    def on_checkpoint(self, model: nn.Module, ckpt_dir: Path, step: int) -> dict[str, str]:
        """Rank-0 extras saved into a checkpoint (plots, telemetry); returns images to log as
        ``{metric key: file name inside the checkpoint}``."""
        return {}
