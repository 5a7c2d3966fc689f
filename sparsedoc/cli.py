"""The ``sparsedoc`` command: one front door to the recipes and tools.

    sparsedoc prepare NAME --src PATH --out DIR     convert a dataset to the unified schema
    sparsedoc prepare mixture CONFIG.yaml --out DIR mix converted sets with weights
    sparsedoc train {moe,lora,full,prompt} [--config Y] [--ds J] [key=value ...]
    sparsedoc benchmark [...]                       step time / memory, side by side
    sparsedoc evaluate --model M --tasks T1,T2 [k=v] benchmark scores -> eval/<task>.json
    sparsedoc report RUN_DIR... [--out DIR]         mean +/- std table, CSV and chart over runs
    sparsedoc generate MODEL --prompt TEXT [...]    reply to prompts (streamed, or --out JSONL)
    sparsedoc chat MODEL [--system TEXT] [...]      interactive chat (/reset, /system, /exit)
    sparsedoc sweep {moe,lora,full,prompt} --out DIR --seeds 0,1,2 [--param K --values a,b]
    sparsedoc export SOURCE OUT [--mode M] [--dtype D] [--force]   verified, servable export

Training through this command runs in one process; for several GPUs or CPU ranks use the
``deepspeed`` launcher on ``recipes/train_*.py`` as the README shows.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
TRAIN_RECIPES = {"moe": "train_moe.py", "lora": "train_lora.py", "full": "train_full.py",
                 "prompt": "train_prompt.py"}
USAGE = __doc__


def _run_recipe(script: str, argv: list[str]) -> int:
    path = RECIPES / script
    if not path.is_file():
        print(f"error: recipe {path} not found (recipes/ ships with the source checkout)",
              file=sys.stderr)
        return 2
    sys.argv = [str(path), *argv]
    runpy.run_path(str(path), run_name="__main__")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "prepare":
        from data_prep.cli import main as prepare_main
        return prepare_main(rest)
    if cmd == "train":
        if not rest or rest[0] not in TRAIN_RECIPES:
            print(f"usage: sparsedoc train {{{','.join(TRAIN_RECIPES)}}} [args]", file=sys.stderr)
            return 2
        return _run_recipe(TRAIN_RECIPES[rest[0]], rest[1:])
    if cmd == "benchmark":
        return _run_recipe("benchmark.py", rest)
    if cmd == "evaluate":
        return _run_recipe("evaluate.py", rest)
    if cmd == "report":
        from sparsedoc.eval.report import main as report_main
        return report_main(rest)
    if cmd in ("generate", "chat"):
        from sparsedoc import generate
        return generate.generate_main(rest) if cmd == "generate" else generate.chat_main(rest)
    if cmd == "export":
        from sparsedoc.export import main as export_main
        return export_main(rest)
    if cmd == "sweep":
        from sparsedoc.sweep import main as sweep_main
        return sweep_main(rest)
    print(f"error: unknown command {cmd!r}\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
