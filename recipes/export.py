"""Export a training run, a checkpoint or an adapter folder as a verified, servable checkpoint.

    python recipes/export.py runs/moe-demo exports/moe-demo                 # auto mode
    python recipes/export.py runs/lora-demo exports/lora-demo --dtype bf16
    python recipes/export.py runs/moe-demo exports/moe-demo-dense --mode dense

Same as ``sparsedoc export``; see ``sparsedoc/export/__init__.py`` for the modes and the checks.
"""

from __future__ import annotations

from sparsedoc.export import main

if __name__ == "__main__":
    raise SystemExit(main())
