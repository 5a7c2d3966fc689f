"""Single-LoRA baseline (peft) on the shared loop. Code: sparsedoc/recipes/train_lora.py.

    deepspeed recipes/train_lora.py --ds ds_configs/zero2.json [key=value ...]
    python recipes/train_lora.py train.max_steps=20          # one process, no launcher
"""

from sparsedoc.recipes.train_lora import main

if __name__ == "__main__":
    main()
