"""What the peft-backed methods share: peft writes and reads their adapter folder."""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from torch import nn

from sparsedoc.methods.base import Method
from sparsedoc.models.load import is_encoder_decoder


def peft_task_type(model: nn.Module) -> str:
    """peft's task type for ``model``: SEQ_2_SEQ_LM wraps an encoder-decoder (its forward takes
    encoder ids and decoder labels), CAUSAL_LM a decoder-only model."""
    return "SEQ_2_SEQ_LM" if is_encoder_decoder(model) else "CAUSAL_LM"


class PeftAdapterMethod(Method):
    """A method whose ``build`` returns a peft model: the adapter folder is peft's own format
    (``PeftModel.from_pretrained(base, folder)`` loads it, with or without sparsedoc)."""

    def write_adapter(self, model: nn.Module, out_dir: Path) -> None:
        model.save_pretrained(out_dir, safe_serialization=True)

    @classmethod
    def load_adapter(cls, model: nn.Module, adapter_dir: Path) -> nn.Module:
        return PeftModel.from_pretrained(model, str(adapter_dir))
