"""Score any model on medical benchmarks: a base model, a training run, a checkpoint, an export.

    python recipes/evaluate.py --model embedded --tasks cmexam,cmmlu_med,pubmedqa,medqa,mts_dialog
    python recipes/evaluate.py --model runs/moe-demo --tasks cmexam:validation --limit 200 \
        mcq_scorer=both num_fewshot=5 prompt_format=plain
    sparsedoc evaluate --model runs/lora-demo --tasks medigen max_new_tokens=512

Tasks name converted data in ``data_root`` (``sparsedoc prepare NAME --out runs/data/NAME``) or
are paths. Results: ``<run>/eval/<task>.json`` for a run folder, else ``runs/eval/<model>/``;
any ``key=value`` sets an ``EvalCfg`` field (``sparsedoc/config.py``, ``docs/eval.md``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from sparsedoc.config import EvalCfg, load_config
from sparsedoc.errors import UserError
from sparsedoc.eval.runner import evaluate

FLAGS = {"model": "model", "tasks": "tasks", "limit": "limit", "scorer": "mcq_scorer",
         "fewshot": "num_fewshot", "format": "prompt_format", "out": "output_dir",
         "data_root": "data_root", "batch_size": "batch_size"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Extra arguments are EvalCfg overrides (key=value).")
    p.add_argument("--config", help="YAML file of EvalCfg fields")
    p.add_argument("--model", help="base id/folder, 'embedded', run, checkpoint or export folder")
    p.add_argument("--tasks", help="comma-separated task names or paths (name:split allowed)")
    p.add_argument("--limit", type=int, help="items per task (seeded subset; 0: all)")
    p.add_argument("--scorer", choices=["loglik", "generate", "both"], help="MCQ scorer")
    p.add_argument("--fewshot", type=int, help="k-shot examples for MCQ (from the dev split)")
    p.add_argument("--format", choices=["chat", "plain"], help="prompt format")
    p.add_argument("--out", help="output folder (default: <run>/eval or runs/eval/<model>)")
    p.add_argument("--data-root", dest="data_root", help="folder of converted data sets")
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("overrides", nargs="*", help="EvalCfg key=value")
    args = p.parse_args(argv)
    overrides = [f"{field}={getattr(args, flag)}" for flag, field in FLAGS.items()
                 if getattr(args, flag) is not None] + args.overrides
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stdout, force=True)
    try:
        cfg = load_config(args.config, overrides, cls=EvalCfg)
        evaluate(cfg)
    except (UserError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
