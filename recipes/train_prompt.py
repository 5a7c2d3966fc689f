"""Prompt-tuning baseline (peft virtual tokens) on the shared loop.

    deepspeed recipes/train_prompt.py --ds ds_configs/zero2.json [key=value ...]
"""

from pathlib import Path

from sparsedoc.baselines.prompt import PromptMethod
from sparsedoc.train.recipe import run_recipe

if __name__ == "__main__":
    run_recipe(PromptMethod(), str(Path(__file__).parent / "configs" / "prompt_demo.yaml"))
