"""Single-LoRA baseline: peft's LoraConfig on the same target modules as the MoE."""

from __future__ import annotations

import copy

from peft import LoraConfig, get_peft_model
from torch import nn

from sparsedoc.config import Config
from sparsedoc.methods.peft_adapter import PeftAdapterMethod, peft_task_type


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
                              target_modules=c.target_modules, task_type=peft_task_type(model),
                              bias="none")
        return get_peft_model(model, peft_cfg)

    @classmethod
    def merged(cls, model: nn.Module) -> nn.Module:
        return copy.deepcopy(model).merge_and_unload()  # peft's own merge, exact LoRA maths
