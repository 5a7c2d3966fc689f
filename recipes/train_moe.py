"""LoRA-MoE (SparseDoctor-style): routed LoRA experts with a contrastive router and an expert Code: sparsedoc/recipes/train_moe.py.

    deepspeed recipes/train_moe.py --ds ds_configs/zero2.json [key=value ...]
    python recipes/train_moe.py train.max_steps=20          # one process, no launcher
"""

from sparsedoc.recipes.train_moe import main

if __name__ == "__main__":
    main()
