"""Single-LoRA baseline (peft) on the shared loop.

    deepspeed recipes/train_lora.py --ds ds_configs/zero2.json [key=value ...]
    python recipes/train_lora.py train.max_steps=20          # one process, no launcher
"""

from pathlib import Path

from sparsedoc.baselines.lora import LoraMethod
from sparsedoc.train.recipe import run_recipe

if __name__ == "__main__":
    run_recipe(LoraMethod(), str(Path(__file__).parent / "configs" / "lora_demo.yaml"))
