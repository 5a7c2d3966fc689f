"""Prompt-tuning baseline (peft virtual tokens) on the shared loop.

    deepspeed recipes/train_prompt.py --ds ds_configs/zero2.json [key=value ...]   # a checkout
    deepspeed --module sparsedoc.recipes.train_prompt --ds zero2 [key=value ...]   # installed
    sparsedoc train prompt [--gpus N] [key=value ...]
"""

from __future__ import annotations

from sparsedoc.train.recipe import run_recipe


def main(argv: list[str] | None = None):
    return run_recipe("prompt", argv)


if __name__ == "__main__":
    main()
