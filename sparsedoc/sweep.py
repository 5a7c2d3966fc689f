"""A grid of training runs over seeds and one hyper-parameter, then evaluation and the report.

    sparsedoc sweep lora --seeds 0,1,2 --param rank --values 4,8,16 --out runs/sweep-lora \
        --eval-tasks cmexam,mts_dialog --eval-arg limit=200 train.max_steps=500
    sparsedoc sweep moe --seeds 0,1,2 --param experts --values 2,4,8 --out runs/sweep-moe \
        --launcher "deepspeed --num_gpus 8" --ds ds_configs/zero2.json
    sparsedoc sweep prompt --seeds 0,1 --param prompt_tokens --values 10,20,40 --dry-run

Runs go one after another into ``<out>/<method>_<param><value>_seed<seed>``; a run whose
``summary.json`` exists is done and skipped, so a sweep that died resumes where it stopped (a
half-finished run resumes from its checkpoint: ``train.resume_from=auto``). ``sweep.json`` in
``<out>`` records the grid and each run's status; the report is grouped by method and the swept
key.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from sparsedoc import fsio
from sparsedoc import recipes
from sparsedoc.artifacts import run_finished
from sparsedoc.methods import ALIASES, METHODS, method_class, method_name



@dataclass
class SweepRun:
    run_dir: str
    seed: int
    value: str | None
    overrides: list[str]


def param_aliases() -> dict[str, dict[str, str]]:
    """``--param`` short name -> {method: config key}, from the methods' ``sweep_params``."""
    out: dict[str, dict[str, str]] = {}
    for name in METHODS:
        for short, key in method_class(name).sweep_params.items():
            out.setdefault(short, {})[name] = key
    return out


def resolve_param(method: str, param: str) -> str:
    """The config key ``--param`` names for ``method``: a method's short name, or the key."""
    aliases = param_aliases()
    if param in aliases:
        keys = aliases[param]
        if method_name(method) not in keys:
            raise ValueError(f"--param {param} does not apply to method {method} (applies to "
                             f"{', '.join(keys)}); give the full config key instead")
        return keys[method_name(method)]
    return param


def plan(method: str, seeds: list[int], out: str | Path, param: str = "",
         values: list[str] | None = None, overrides: list[str] | None = None) -> list[SweepRun]:
    """Every (value, seed) combination, value-major, with its run folder and overrides."""
    method_name(method)  # an unknown method fails here, naming the known ones
    key = resolve_param(method, param) if param else ""
    if key and not values:
        raise ValueError("--param needs --values")
    short = key.rsplit(".", 1)[-1] if key else ""
    runs = []
    for v in (values or [None]):
        for s in seeds:
            name = f"{method}_{short}{v}_seed{s}" if v is not None else f"{method}_seed{s}"
            run_dir = str(Path(out) / name)
            ov = list(overrides or []) + [f"train.seed={s}", f"train.output_dir={run_dir}",
                                          "train.resume_from=auto"]
            if v is not None:
                ov.append(f"{key}={v}")
            runs.append(SweepRun(run_dir, s, v, ov))
    return runs


def train_command(method: str, run: SweepRun, launcher: str = "", ds: str = "",
                  config: str = "") -> list[str]:
    args = (["--config", config] if config else []) + (["--ds", ds] if ds else [])
    return recipes.train_command(method, args + run.overrides, launcher=launcher)


def eval_command(run: SweepRun, tasks: str, eval_args: list[str]) -> list[str]:
    return [sys.executable, "-m", "sparsedoc.recipes.evaluate", "--model", run.run_dir,
            "--tasks", tasks, *eval_args]


def _write_manifest(out: Path, meta: dict, runs: list[SweepRun], status: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    data = {**meta, "runs": [{**asdict(r), "status": status.get(r.run_dir, "pending")}
                             for r in runs]}
    fsio.write_json(out / "sweep.json", data)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparsedoc sweep", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("method", choices=[*METHODS, *ALIASES])
    p.add_argument("--out", required=True, help="sweep folder (one run folder per grid point)")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: %(default)s)")
    p.add_argument("--param", default="", help=f"swept config key or one of "
                                               f"{sorted(param_aliases())}")
    p.add_argument("--values", default="", help="comma-separated values of --param")
    p.add_argument("--launcher", default="", help="e.g. 'deepspeed --num_gpus 8' (default: "
                                                  "this python, one process)")
    p.add_argument("--ds", default="", help="DeepSpeed JSON passed to the recipe")
    p.add_argument("--config", default="", help="recipe YAML config")
    p.add_argument("--eval-tasks", default="", help="evaluate every run on these tasks")
    p.add_argument("--eval-arg", action="append", default=[],
                   help="extra evaluate argument, e.g. --eval-arg limit=200 (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("overrides", nargs="*", help="config overrides for every run (key=value)")
    # intermixed: the overrides may follow the options, as the module docstring writes them
    args = p.parse_intermixed_args(argv)
    seeds = [int(s) for s in args.seeds.split(",") if s != ""]
    values = [v for v in args.values.split(",") if v != ""]
    try:
        runs = plan(args.method, seeds, args.out, args.param, values, args.overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    key = resolve_param(args.method, args.param) if args.param else ""
    out = Path(args.out)
    meta = {"method": args.method, "param": key, "values": values, "seeds": seeds}
    status: dict[str, str] = {}
    for run in runs:
        cmds = [train_command(args.method, run, args.launcher, args.ds, args.config)]
        if args.eval_tasks:
            cmds.append(eval_command(run, args.eval_tasks, args.eval_arg))
        if args.dry_run:
            print("\n".join(shlex.join(c) for c in cmds))
            continue
        if run_finished(run.run_dir):
            print(f"[sweep] {run.run_dir}: trained already, skipped")
            cmds = cmds[1:]
        for cmd in cmds:
            print(f"[sweep] {shlex.join(cmd)}", flush=True)
            rc = subprocess.run(cmd).returncode
            if rc != 0:
                status[run.run_dir] = f"failed (exit {rc})"
                _write_manifest(out, meta, runs, status)
                print(f"error: {shlex.join(cmd)} exited with {rc}; rerun the sweep to resume",
                      file=sys.stderr)
                return rc
        status[run.run_dir] = "done"
        _write_manifest(out, meta, runs, status)
    if args.dry_run:
        return 0
    from sparsedoc.eval.report import build_report

    group_by = ["adapter.method"] + ([key] if key else [])
    try:
        res = build_report([r.run_dir for r in runs], out / "report", group_by)
    except FileNotFoundError as e:  # trained but not evaluated: nothing to compare yet
        print(f"[sweep] no report: {e}")
        return 0
    print(res["markdown"])
    print(f"report: {(out / 'report').resolve()}")
    return 0
