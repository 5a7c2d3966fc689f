"""Command line of every training recipe: ``--config`` YAML, ``--ds`` JSON, ``key=value`` overrides.

The method is ``adapter.method`` of the resolved config, looked up in ``sparsedoc.methods``: a
recipe for one method only sets it (and its default config). The ``deepspeed`` launcher appends
``--local_rank N``; it is accepted and ignored (the rank comes from the environment it sets).
``--dry-run`` prints the resolved config and the filled DeepSpeed JSON for ``--world-size``
ranks and exits, loading no model and no data: the check that a cluster config parses and
resolves before any GPU is booked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import yaml

from sparsedoc.config import Config, config_to_dict, load_config
from sparsedoc.errors import UserError
from sparsedoc.methods import method_class, method_name, new_method
from sparsedoc.resources import ds_config_path, recipe_config_path


def _parser(method: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=f"Train with method '{method}'. Extra arguments are config overrides, "
                    "e.g. train.max_steps=200 adapter.moe.num_experts=8")
    p.add_argument("--config", default=method_class(method).default_config,
                   help="YAML run config, a path or a bundled name (default: %(default)s)")
    p.add_argument("--ds", default="zero2",
                   help="DeepSpeed JSON template, a path or a bundled name (zero2, zero3, "
                        "zero3_offload); 'auto' values are filled from the config")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved config and the filled DeepSpeed JSON, then exit")
    p.add_argument("--world-size", type=int, default=0,
                   help="ranks the dry-run fills the DeepSpeed JSON for (default: $WORLD_SIZE "
                        "or 1)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=-1, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="key.sub=value")
    return p


def parse_args(argv: list[str] | None, method: str
               ) -> tuple[Config, str, argparse.Namespace]:
    args = _parser(method).parse_intermixed_args(argv)  # key=value before and after flags
    cfg = load_config(str(recipe_config_path(args.config)),
                      args.overrides + [f"adapter.method={method}"])
    return cfg, str(ds_config_path(args.ds)), args


def dry_run(cfg: Config, ds_template: str, world_size: int) -> dict:
    """Print the resolved config (YAML) and the DeepSpeed JSON a launch with ``world_size``
    ranks would use on this machine; return the JSON."""
    import torch

    from sparsedoc.models.load import resolve_dtype
    from sparsedoc.distributed import build_ds_config

    ds = build_ds_config(ds_template, cfg, world_size, resolve_dtype(cfg.model.dtype))
    print(f"# resolved config ({cfg.adapter.method})")
    print(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True), end="")
    print(f"# DeepSpeed JSON from {ds_template}, {world_size} ranks"
          + ("" if torch.cuda.is_available() else
             " (filled on a machine without CUDA: on GPUs the optimizer is DeepSpeed's fused "
             "AdamW, not torch_adam)"))
    print(json.dumps(ds, indent=2))
    return ds


def run_recipe(method: str, argv: list[str] | None = None):
    """Parse the command line and train ``method`` (or dry-run). Bad input (a ``UserError``:
    config, DeepSpeed JSON, model path, data files, checkpoint) exits with status 2 and the
    message, not a traceback; it is refused before the run folder is written."""
    from sparsedoc.train.loop import train

    try:
        method = method_name(method)
        cfg, ds, args = parse_args(argv, method)
        if args.dry_run:
            return dry_run(cfg, ds, args.world_size or int(os.environ.get("WORLD_SIZE", "1")))
        return train(cfg, new_method(cfg.adapter.method), ds)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
