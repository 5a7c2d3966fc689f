"""Export a run as a verified, servable model. Code: sparsedoc/recipes/export.py.

    python recipes/export.py runs/moe-demo exports/moe-demo
"""

from sparsedoc.export import main

if __name__ == "__main__":
    raise SystemExit(main())
