"""``sparsedoc prepare``: the single front door to every converter and to mixtures.

    prepare list
    prepare NAME --src PATH --out DIR [--strict] [--hf ID] [--seed N] [converter options]
    prepare mixture CONFIG.yaml --out DIR

``argv`` may start with ``prepare`` (as ``python -m data_prep prepare ...``) or not (as
``sparsedoc prepare ...`` hands over what follows the sub-command). ``NAME --help`` shows the
options of one converter.
"""

from __future__ import annotations

import sys

from sparsedoc.prep.registry import REGISTRY, get_info, load_converter

USAGE = ("usage: prepare list | prepare NAME --src PATH --out DIR [--strict] [--hf ID] [--seed N]"
         " | prepare mixture CONFIG.yaml --out DIR")


def list_datasets() -> str:
    """A table of the known datasets, with license and the non-commercial flag."""
    rows = [("name", "task", "lang", "NC", "license")]
    rows += [(i.name, i.task, i.lang, "yes" if i.non_commercial else "", i.license)
             for i in REGISTRY.values()]
    widths = [max(len(r[c]) for r in rows) for c in range(4)]
    return "\n".join("  ".join(r[c].ljust(widths[c]) for c in range(4)) + "  " + r[4]
                     for r in rows)


def main(argv: list[str] | None = None) -> int:
    """Run one ``prepare`` command; returns the process exit code (0 ok, 2 error)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["prepare"]:
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "list":
        print(list_datasets())
        return 0
    if command == "mixture":
        from sparsedoc.prep.mixture import main as mixture_main
        return mixture_main(rest)
    try:
        info = get_info(command)
    except KeyError as e:
        print(f"error: {e.args[0]}\n{USAGE}", file=sys.stderr)
        return 2
    return load_converter(command).main([*info.cli_args, *rest])


if __name__ == "__main__":
    raise SystemExit(main())
