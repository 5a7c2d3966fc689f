"""Prompt-tuning baseline (peft virtual tokens) on the shared loop. Code: sparsedoc/recipes/train_prompt.py.

    deepspeed recipes/train_prompt.py --ds ds_configs/zero2.json [key=value ...]
    python recipes/train_prompt.py train.max_steps=20          # one process, no launcher
"""

from sparsedoc.recipes.train_prompt import main

if __name__ == "__main__":
    main()
