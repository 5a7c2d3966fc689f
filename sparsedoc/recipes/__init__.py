"""The recipes as package modules, so an installed sparsedoc trains without a checkout.

    python -m sparsedoc.recipes.train_moe [key=value ...]                  # one process
    deepspeed --num_gpus 8 --module sparsedoc.recipes.train_moe --ds zero2  # several ranks
    sparsedoc train lora_moe --gpus 8 [key=value ...]                       # the same, for you

The files in the checkout's ``recipes/`` folder are thin wrappers around these modules.
"""

from __future__ import annotations

import shlex
import sys

from sparsedoc.methods import method_name

TRAIN_MODULE = "sparsedoc.recipes.train"  # trains any method: --method NAME


def train_command(method: str, args: list[str], gpus: int = 1, launcher: str = "") -> list[str]:
    """The command line that trains ``method``: this interpreter for one process, else the
    ``deepspeed`` launcher (``launcher`` overrides it, e.g. ``"deepspeed --hostfile hosts"``)."""
    args = ["--method", method_name(method), *args]
    if not launcher and gpus <= 1:
        return [sys.executable, "-m", TRAIN_MODULE, *args]
    if launcher:
        cmd = shlex.split(launcher)
    else:  # the launcher of this interpreter's deepspeed, whatever is first on PATH
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(gpus)]
    return [*cmd, "--module", TRAIN_MODULE, *args]
