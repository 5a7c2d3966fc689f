"""LoRA-MoE (SparseDoctor-style): routed LoRA experts with a contrastive router and an expert
memory queue, on the shared loop.

    deepspeed recipes/train_moe.py --ds ds_configs/zero2.json [key=value ...]   # a checkout
    deepspeed --module sparsedoc.recipes.train_moe --ds zero2 [key=value ...]   # installed
    sparsedoc train lora_moe [--gpus N] [key=value ...]
"""

from __future__ import annotations

from sparsedoc.train.recipe import run_recipe


def main(argv: list[str] | None = None):
    return run_recipe("lora_moe", argv)


if __name__ == "__main__":
    main()
