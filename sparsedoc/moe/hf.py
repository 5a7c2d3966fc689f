"""The routed LoRA-MoE as a transformers model class, for exact ("routed") exports.

A routed export is an ordinary transformers folder (``config.json`` + sharded safetensors +
tokenizer) whose ``model_type`` is ``sparsedoc_lora_moe``: a Llama with every targeted linear a
``LoRAMoELinear`` (or every MLP a ``LoRAMoEFFN``). ``register_auto_classes()`` registers the class
with ``AutoConfig`` / ``AutoModelForCausalLM`` (explicitly: importing this module changes nothing),
so after it (or through ``sparsedoc.load_pretrained``) the stock ``from_pretrained`` loads it, with the code of the
installed library: no ``trust_remote_code``, no Python shipped inside the model folder. Without
sparsedoc, transformers refuses the unknown model type with an error; it never silently loads the
base model without the experts.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from sparsedoc.config import MoECfg

MODEL_TYPE = "sparsedoc_lora_moe"


@strict
class SparsedocMoEConfig(LlamaConfig):
    """A Llama config plus the LoRA-MoE layout (``MoECfg`` as a dict)."""

    model_type = MODEL_TYPE
    sparsedoc_moe: dict | None = None


class SparsedocMoEForCausalLM(LlamaForCausalLM):
    """``LlamaForCausalLM`` with the LoRA-MoE layers of ``config.sparsedoc_moe`` injected."""

    config_class = SparsedocMoEConfig

    def __init__(self, config: SparsedocMoEConfig):
        from sparsedoc.moe.inject import inject_lora_moe

        super().__init__(config)
        if not config.sparsedoc_moe:
            raise ValueError("config.json of a sparsedoc_lora_moe model has no sparsedoc_moe "
                             "section (the expert layout)")
        inject_lora_moe(self, MoECfg(**config.sparsedoc_moe), dispatch="dense")
        self.requires_grad_(False)


def register_auto_classes() -> None:
    """Let ``AutoConfig`` / ``AutoModelForCausalLM`` load routed exports (idempotent)."""
    AutoConfig.register(MODEL_TYPE, SparsedocMoEConfig, exist_ok=True)
    AutoModelForCausalLM.register(SparsedocMoEConfig, SparsedocMoEForCausalLM, exist_ok=True)


def load_pretrained(path: str, **kwargs):
    """Load a routed sparsedoc export (or any model transformers can load) from ``path``."""
    register_auto_classes()
    return AutoModelForCausalLM.from_pretrained(path, **kwargs)
