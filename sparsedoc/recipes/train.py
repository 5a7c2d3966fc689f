"""Train any registered method (``sparsedoc.methods.METHODS``) on the shared loop.

    python -m sparsedoc.recipes.train --method lora [key=value ...]
    deepspeed --num_gpus 8 --module sparsedoc.recipes.train --method lora_moe --ds zero2

``sparsedoc train METHOD`` runs this; ``train_moe`` and the other per-method modules are the
same with their method set.
"""

from __future__ import annotations

import sys

from sparsedoc.methods import METHODS
from sparsedoc.train.recipe import run_recipe


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--method" not in argv[:-1]:
        print(f"error: --method NAME is required (one of: {', '.join(METHODS)})", file=sys.stderr)
        raise SystemExit(2)
    i = argv.index("--method")
    return run_recipe(argv[i + 1], argv[:i] + argv[i + 2:])


if __name__ == "__main__":
    main()
