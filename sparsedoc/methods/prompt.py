"""Prompt-tuning baseline: peft trainable virtual tokens, initialised from a text."""

from __future__ import annotations

from peft import PromptTuningConfig, PromptTuningInit, get_peft_model
from torch import nn

from sparsedoc.config import Config
from sparsedoc.methods.peft_adapter import PeftAdapterMethod, peft_task_type
from sparsedoc.models.load import resolve_model_path


class PromptMethod(PeftAdapterMethod):
    name = "prompt"
    title = "prompt tuning"
    summary = "prompt tuning: a trained soft prompt in front of the frozen base"
    tag = "prompt-tuning"
    config_section = "prompt"
    default_config = "prompt_demo"
    no_export_reason = ("prompt tuning keeps a soft prompt that no merged checkpoint can hold; "
                        "share the adapter folder (checkpoints/step-N/adapter, loads with peft)")
    sweep_params = {"prompt_tokens": "adapter.prompt.num_virtual_tokens"}

    def build(self, model: nn.Module, cfg: Config) -> nn.Module:
        c = cfg.adapter.prompt
        init = dict(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=c.init_text,
                    tokenizer_name_or_path=resolve_model_path(cfg.model)) if c.init_text else {}
        peft_cfg = PromptTuningConfig(task_type=peft_task_type(model),
                                      num_virtual_tokens=c.num_virtual_tokens, **init)
        return get_peft_model(model, peft_cfg)
