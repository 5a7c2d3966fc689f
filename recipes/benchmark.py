"""Step time and memory side by side. Code: sparsedoc/recipes/benchmark.py.

    python recipes/benchmark.py
"""

from sparsedoc.recipes.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
