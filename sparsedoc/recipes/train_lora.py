"""Single-LoRA baseline (peft) on the shared loop.

    deepspeed recipes/train_lora.py --ds ds_configs/zero2.json [key=value ...]   # a checkout
    deepspeed --module sparsedoc.recipes.train_lora --ds zero2 [key=value ...]   # installed
    sparsedoc train lora [--gpus N] [key=value ...]
"""

from __future__ import annotations

from sparsedoc.train.recipe import run_recipe


def main(argv: list[str] | None = None):
    return run_recipe("lora", argv)


if __name__ == "__main__":
    main()
