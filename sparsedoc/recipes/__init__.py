"""The recipes as package modules, so an installed sparsedoc trains without a checkout.

    python -m sparsedoc.recipes.train_moe [key=value ...]                  # one process
    deepspeed --num_gpus 8 --module sparsedoc.recipes.train_moe --ds zero2  # several ranks
    sparsedoc train lora_moe --gpus 8 [key=value ...]                       # the same, for you

The files in the checkout's ``recipes/`` folder are thin wrappers around these modules.
"""

from __future__ import annotations

import shlex
import sys

# adapter.method -> the recipe module that trains it
TRAIN_MODULES = {"lora_moe": "sparsedoc.recipes.train_moe", "lora": "sparsedoc.recipes.train_lora",
                 "full": "sparsedoc.recipes.train_full",
                 "prompt": "sparsedoc.recipes.train_prompt"}
METHOD_ALIASES = {"moe": "lora_moe"}


def method_name(name: str) -> str:
    """The canonical method name for ``name`` (``moe`` is accepted for ``lora_moe``)."""
    method = METHOD_ALIASES.get(name, name)
    if method not in TRAIN_MODULES:
        raise ValueError(f"unknown method {name!r}; expected one of {', '.join(TRAIN_MODULES)}")
    return method


def train_command(method: str, args: list[str], gpus: int = 1, launcher: str = "") -> list[str]:
    """The command line that trains ``method``: this interpreter for one process, else the
    ``deepspeed`` launcher (``launcher`` overrides it, e.g. ``"deepspeed --hostfile hosts"``)."""
    module = TRAIN_MODULES[method_name(method)]
    if not launcher and gpus <= 1:
        return [sys.executable, "-m", module, *args]
    if launcher:
        cmd = shlex.split(launcher)
    else:  # the launcher of this interpreter's deepspeed, whatever is first on PATH
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus)]
    return [*cmd, "--module", module, *args]
