"""Full fine-tune baseline on the shared loop (every weight trains).

    deepspeed recipes/train_full.py --ds ds_configs/zero3.json [key=value ...]
"""

from pathlib import Path

from sparsedoc.baselines.full import FullMethod
from sparsedoc.train.recipe import run_recipe

if __name__ == "__main__":
    run_recipe(FullMethod(), str(Path(__file__).parent / "configs" / "full_demo.yaml"))
