"""The ``sparsedoc`` command: one front door to the recipes and tools.

    sparsedoc --version
    sparsedoc env [--json]                          versions, CUDA/bf16/flash-attn, DeepSpeed ops

    sparsedoc prepare NAME --src PATH --out DIR     convert a dataset to the unified schema
    sparsedoc prepare mixture CONFIG.yaml --out DIR mix converted sets with weights
    sparsedoc lengths FILE.jsonl... [--model M]     token lengths; records kept at 2048/4096
    sparsedoc train METHOD [--gpus N] [--config Y] [--ds zero2] [key=value ...]
                                                    METHOD: lora_moe, lora, full, prompt, ...;
                                                    --dry-run: print the resolved config and
                                                    DeepSpeed JSON for N GPUs, train nothing
    sparsedoc bench [--preset tiny|smollm2] [...]   step time / memory of every method, side
                                                    by side; --dry-run llama3-8b: params,
                                                    FLOPs, ZeRO memory; --generation: decoding
    sparsedoc bench --data [--records N]            tokenize cache, 2-rank start-up, RSS
    sparsedoc evaluate --model M --tasks T1,T2 [k=v] benchmark scores -> eval/<task>.json
    sparsedoc report RUN_DIR... [--out DIR]         mean +/- std table, CSV and chart over runs
    sparsedoc generate MODEL --prompt TEXT [...]    reply to prompts (streamed, or --out JSONL)
    sparsedoc chat MODEL [--system TEXT] [...]      interactive chat (/reset, /system, /exit)
    sparsedoc sweep METHOD --out DIR --seeds 0,1,2 [--param K --values a,b]
    sparsedoc export SOURCE OUT [--mode M] [--dtype D] [--force]   verified, servable export

``sparsedoc train`` runs in this process, or starts the ``deepspeed`` launcher for you with
``--gpus N`` (N > 1) or ``--launcher "deepspeed --hostfile hosts ..."``.
"""

from __future__ import annotations

import subprocess
import sys

USAGE = __doc__


def _train(argv: list[str]) -> int:
    import argparse

    from sparsedoc.methods import METHODS, UnknownMethod, method_name
    from sparsedoc.recipes import train_command
    from sparsedoc.train.recipe import run_recipe

    p = argparse.ArgumentParser(
        prog="sparsedoc train", add_help=False,
        description="Train one method on the shared loop. Other arguments (--config, --ds, "
                    "key=value) go to the recipe: sparsedoc train METHOD --help lists them.")
    p.add_argument("method", nargs="?", help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--gpus", type=int, default=1,
                   help="ranks on this node; > 1 starts the deepspeed launcher (CPU ranks too)")
    p.add_argument("--launcher", default="",
                   help='launcher command line, e.g. "deepspeed --hostfile hosts"')
    args, rest = p.parse_known_args(argv)
    if args.method is None:
        p.print_help()
        return 0 if {"-h", "--help"} & set(rest) else 2
    try:
        method = method_name(args.method)
    except UnknownMethod as e:
        p.error(str(e))
    wants_help = bool({"-h", "--help"} & set(rest))
    if "--dry-run" in rest and "--world-size" not in rest:  # fill the JSON for --gpus ranks
        rest = [*rest, "--world-size", str(args.gpus)]
    if wants_help or "--dry-run" in rest or (args.gpus <= 1 and not args.launcher):  # here
        run_recipe(method, rest)
        return 0
    cmd = train_command(method, rest, gpus=args.gpus, launcher=args.launcher)
    print("+ " + " ".join(cmd), flush=True)
    return subprocess.run(cmd).returncode


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd in ("-V", "--version"):
        from sparsedoc import __version__
        print(f"sparsedoc {__version__}")
        return 0
    if cmd == "env":
        from sparsedoc.env import main as env_main
        return env_main(rest)
    if cmd == "prepare":
        from sparsedoc.prep.cli import main as prepare_main
        return prepare_main(rest)
    if cmd == "lengths":
        from sparsedoc.data.lengths import main as lengths_main
        return lengths_main(rest)
    if cmd == "train":
        return _train(rest)
    if cmd in ("bench", "benchmark") and "--data" in rest:
        from sparsedoc.recipes.bench_data import main as bench_data_main
        return bench_data_main([a for a in rest if a != "--data"])
    if cmd in ("bench", "benchmark"):  # "benchmark": its earlier name
        from sparsedoc.bench.run import main as bench_main
        return bench_main(rest)
    if cmd == "evaluate":
        from sparsedoc.recipes.evaluate import main as evaluate_main
        return evaluate_main(rest)
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
