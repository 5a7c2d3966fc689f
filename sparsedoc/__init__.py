"""sparsedoc: train medical LLMs with a mixture of LoRA experts."""

__version__ = "0.1.0"
