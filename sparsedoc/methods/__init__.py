"""The training methods, by name: the one table every command looks a method up in.

Each method is one module here with one ``Method`` subclass (``sparsedoc.methods.base``) that
owns everything that differs between methods: building the adapter, the loss terms, saving and
loading the adapter, which export modes apply, and the facts a model card states. Adding a
method is a new module and one line in ``METHODS`` (docs/architecture.md has a worked example).
Entries are import paths, so looking a name up does not import every method's dependencies.
"""

from __future__ import annotations

import importlib

from sparsedoc.errors import UserError
from sparsedoc.methods.base import Method

# adapter.method -> "module:Class"
METHODS = {
    "lora_moe": "sparsedoc.methods.lora_moe:LoraMoEMethod",
    "lora": "sparsedoc.methods.lora:LoraMethod",
    "full": "sparsedoc.methods.full:FullMethod",
    "prompt": "sparsedoc.methods.prompt:PromptMethod",
    "sensitivity_lora": "sparsedoc.methods.sensitivity_lora:SensitivityLoraMethod",
}
ALIASES = {"moe": "lora_moe"}  # accepted on the command line


class UnknownMethod(UserError, ValueError):
    pass


def method_name(name: str) -> str:
    """The canonical name for ``name`` (an alias such as ``moe`` resolves)."""
    canonical = ALIASES.get(name, name)
    if canonical not in METHODS:
        raise UnknownMethod(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")
    return canonical


def method_class(name: str) -> type[Method]:
    module, cls = METHODS[method_name(name)].split(":")
    return getattr(importlib.import_module(module), cls)


def new_method(name: str) -> Method:
    """A fresh instance of the method called ``name`` (methods hold per-run state)."""
    return method_class(name)()
