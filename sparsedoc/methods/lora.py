"""Single-LoRA baseline: peft's LoraConfig on the same target modules as the MoE."""

from __future__ import annotations

import copy
import logging

from peft import LoraConfig, get_peft_model
from torch import nn

from sparsedoc.config import Config, LoraCfg
from sparsedoc.errors import UserError
from sparsedoc.methods.peft_adapter import PeftAdapterMethod, peft_task_type
from sparsedoc.models.load import is_encoder_decoder

log = logging.getLogger("sparsedoc")

DECODER_DEFAULT_TARGETS = LoraCfg().target_modules  # Llama-style names (q_proj, ..., down_proj)


def lora_targets(model: nn.Module, targets: list[str]) -> list[str]:
    """The LoRA target modules for ``model``. The default names are a decoder's; an
    encoder-decoder left at that default gets peft's own default for its architecture (T5:
    q, v), logged, instead of a silent partial match or peft's "no target found"."""
    if not is_encoder_decoder(model) or list(targets) != DECODER_DEFAULT_TARGETS:
        return list(targets)
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = model.config.model_type
    fallback = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not fallback:
        raise UserError(f"adapter.lora.target_modules is the decoder default "
                        f"{DECODER_DEFAULT_TARGETS} and peft has no default for the "
                        f"encoder-decoder model type {model_type!r}: set "
                        f"adapter.lora.target_modules to its linear layer names")
    log.info("adapter.lora.target_modules: the decoder default does not fit an encoder-decoder "
             "(%s); using peft's default for it: %s", model_type, list(fallback))
    return list(fallback)


class LoraMethod(PeftAdapterMethod):
    name = "lora"
    title = "LoRA"
    summary = "LoRA fine-tuning: one low-rank adapter on the frozen base (peft)"
    tag = "lora"
    config_section = "lora"
    default_config = "lora_demo"
    export_modes = ("merged",)
    sweep_params = {"rank": "adapter.lora.r"}

    def build(self, model: nn.Module, cfg: Config) -> nn.Module:
        c = cfg.adapter.lora
        peft_cfg = LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout,
                              target_modules=lora_targets(model, c.target_modules),
                              task_type=peft_task_type(model),
                              bias="none")
        return get_peft_model(model, peft_cfg)

    @classmethod
    def merged(cls, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).merge_and_unload()  # peft's own merge, exact LoRA maths
