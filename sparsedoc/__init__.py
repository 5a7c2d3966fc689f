"""sparsedoc: train medical LLMs with a mixture of LoRA experts."""

__version__ = "0.1.0"


def load_pretrained(path: str, **kwargs):
    """Load a sparsedoc export with transformers: a routed LoRA-MoE export (model type
    ``sparsedoc_lora_moe``, whose class this registers with ``AutoModelForCausalLM``) or any
    plain one. ``kwargs`` go to ``from_pretrained`` (``dtype=``, ``device_map=``...)."""
    from sparsedoc.moe.hf import load_pretrained as _load

    return _load(path, **kwargs)
