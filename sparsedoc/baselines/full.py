"""Full fine-tune baseline: every weight trains; DeepSpeed's checkpoint holds the model."""

from __future__ import annotations

from torch import nn

from sparsedoc.config import Config
from sparsedoc.train.method import Method


class FullMethod(Method):
    name = "full"
    exclude_frozen_in_checkpoint = False  # nothing is frozen: the checkpoint is the model

    def build(self, model: nn.Module, cfg: Config) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model
