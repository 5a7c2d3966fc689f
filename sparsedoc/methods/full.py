"""Full fine-tune baseline: every weight trains; DeepSpeed's checkpoint holds the model."""

from __future__ import annotations

from torch import nn

from sparsedoc.config import Config
from sparsedoc.methods.base import Method


class FullMethod(Method):
    name = "full"
    title = "full fine-tune"
    summary = "full fine-tuning: every weight of the base trained"
    tag = "full-fine-tune"
    default_config = "full_demo"
    export_modes = ("merged",)
    exclude_frozen_in_checkpoint = False  # nothing is frozen: the checkpoint is the model

    def build(self, model: nn.Module, cfg: Config) -> nn.Module:
        for p in model.parameters():
            p.requires_grad_(True)
        return model

    @classmethod
    def merged(cls, model: nn.Module) -> nn.Module:
        return model  # nothing to fold in: the trained weights are the model
