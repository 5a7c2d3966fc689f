"""Full fine-tune baseline on the shared loop (every weight trains).

    deepspeed recipes/train_full.py --ds ds_configs/zero3.json [key=value ...]   # a checkout
    deepspeed --module sparsedoc.recipes.train_full --ds zero3 [key=value ...]   # installed
    sparsedoc train full [--gpus N] [key=value ...]
"""

from __future__ import annotations

from sparsedoc.train.recipe import run_recipe


def main(argv: list[str] | None = None):
    return run_recipe("full", argv)


if __name__ == "__main__":
    main()
