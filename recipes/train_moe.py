"""LoRA-MoE (SparseDoctor-style): routed LoRA experts with a contrastive router and an expert
memory queue, on the shared loop.

    deepspeed recipes/train_moe.py --ds ds_configs/zero2.json            # embedded default, CPU ok
    deepspeed --num_gpus 8 recipes/train_moe.py --config recipes/configs/llama3_8b_moe.yaml \
        --ds ds_configs/zero2.json
"""

from pathlib import Path

from sparsedoc.moe.method import MoEMethod
from sparsedoc.train.recipe import run_recipe

if __name__ == "__main__":
    run_recipe(MoEMethod(), str(Path(__file__).parent / "configs" / "moe_demo.yaml"))
