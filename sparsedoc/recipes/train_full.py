"""Full fine-tune baseline on the shared loop (every weight trains).

    deepspeed recipes/train_full.py --ds ds_configs/zero3.json [key=value ...]   # a checkout
    deepspeed --module sparsedoc.recipes.train_full --ds zero3 [key=value ...]   # installed
    sparsedoc train full [--gpus N] [key=value ...]
"""

from __future__ import annotations

from sparsedoc.baselines.full import FullMethod
from sparsedoc.resources import recipe_config_path
from sparsedoc.train.recipe import run_recipe


def main(argv: list[str] | None = None):
    return run_recipe(FullMethod(), str(recipe_config_path("full_demo")), argv)


if __name__ == "__main__":
    main()
