"""Score a model on medical benchmarks. Code: sparsedoc/recipes/evaluate.py.

    python recipes/evaluate.py --model runs/moe-demo --tasks cmexam,mts_dialog
"""

from sparsedoc.recipes.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
