"""Command line of every training recipe: ``--config`` YAML, ``--ds`` JSON, ``key=value`` overrides.

The method is ``adapter.method`` of the resolved config, looked up in ``sparsedoc.methods``: a
recipe for one method only sets it (and its default config). The ``deepspeed`` launcher appends
``--local_rank N``; it is accepted and ignored (the rank comes from the environment it sets).
"""

from __future__ import annotations

import argparse
import sys

from sparsedoc.config import Config, ConfigError, load_config
from sparsedoc.methods import UnknownMethod, method_class, method_name, new_method
from sparsedoc.resources import ds_config_path, recipe_config_path


def parse_args(argv: list[str] | None, method: str) -> tuple[Config, str]:
    default_config = method_class(method).default_config
    p = argparse.ArgumentParser(
        description=f"Train with method '{method}'. Extra arguments are config overrides, "
                    "e.g. train.max_steps=200 adapter.moe.num_experts=8")
    p.add_argument("--config", default=default_config,
                   help="YAML run config, a path or a bundled name (default: %(default)s)")
    p.add_argument("--ds", default="zero2",
                   help="DeepSpeed JSON template, a path or a bundled name (zero2, zero3, "
                        "zero3_offload); 'auto' values are filled from the config")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    args = p.parse_args(argv)
    cfg = load_config(str(recipe_config_path(args.config)),
                      args.overrides + [f"adapter.method={method}"])
    return cfg, str(ds_config_path(args.ds))


def run_recipe(method: str, argv: list[str] | None = None):
    """Parse the command line and train ``method``; config errors exit with the message, not a
    traceback."""
    from sparsedoc.train.loop import train

    try:
        method = method_name(method)
        cfg, ds = parse_args(argv, method)
    except (ConfigError, FileNotFoundError, UnknownMethod) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    return train(cfg, new_method(cfg.adapter.method), ds)
