"""Full fine-tune baseline on the shared loop (every weight trains). Code: sparsedoc/recipes/train_full.py.

    deepspeed recipes/train_full.py --ds ds_configs/zero3.json [key=value ...]
    python recipes/train_full.py train.max_steps=20          # one process, no launcher
"""

from sparsedoc.recipes.train_full import main

if __name__ == "__main__":
    main()
