"""The contrastive ablation. Code: sparsedoc/recipes/ablate_contrastive.py.

    python recipes/ablate_contrastive.py
"""

from sparsedoc.recipes.ablate_contrastive import main

if __name__ == "__main__":
    raise SystemExit(main())
