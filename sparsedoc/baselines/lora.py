"""Single-LoRA baseline: peft's LoraConfig on the same target modules as the MoE."""

from __future__ import annotations

from pathlib import Path

from peft import LoraConfig, get_peft_model
from torch import nn

from sparsedoc.config import Config
from sparsedoc.train.method import Method


class LoraMethod(Method):
    name = "lora"

    def build(self, model: nn.Module, cfg: Config) -> nn.Module:
        c = cfg.adapter.lora
        peft_cfg = LoraConfig(r=c.r, lora_alpha=c.alpha, lora_dropout=c.dropout,
                              target_modules=c.target_modules, task_type="CAUSAL_LM", bias="none")
        return get_peft_model(model, peft_cfg)

    def write_adapter(self, model: nn.Module, out_dir: Path) -> None:
        # peft's own format: PeftModel.from_pretrained(base, out_dir) loads it.
        model.save_pretrained(out_dir, safe_serialization=True)
