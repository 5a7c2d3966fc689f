"""Token-length report: how long converted records are with a given tokenizer, and how many of
them keep their whole target at a row length, with plain right-truncation (the old data path:
a record longer than the row loses the end of its target) and with the target-preserving
truncation of ``tokenize.fit_chat`` (the prompt loses turns instead).

    sparsedoc lengths runs/data/aci_bench/train.jsonl runs/data/mts_dialog/train.jsonl \\
        --model embedded --seq-lens 2048,4096 [--max-target-len N] [--out lengths.json]

Lengths are of the chat-template rendering the training data path tokenizes (``encode_chat``);
the target is the last assistant message (its tokens up to the template's end-of-turn).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from sparsedoc.data.schema import read_jsonl
from sparsedoc.data.tokenize import chat_ids, fit_chat, target_ids, to_chat

PERCENTILES = (50, 90, 95, 99, 100)


def percentile(xs: list[int], p: float) -> int:
    """Nearest-rank percentile: the smallest value with at least p% of the values at or below."""
    s = sorted(xs)
    return s[max(0, math.ceil(p / 100 * len(s)) - 1)]


def record_lengths(record: dict, tokenizer, system_prompt: str = "") -> tuple[int, int]:
    """(total tokens, target tokens) of one record as the training data path renders it."""
    msgs = to_chat(record)["messages"]
    if system_prompt and msgs[0]["role"] != "system":
        msgs = [{"role": "system", "content": system_prompt}] + msgs
    return len(chat_ids(tokenizer, msgs)), len(target_ids(tokenizer, msgs))


def length_report(records: list[dict], tokenizer, seq_lens: list[int], system_prompt: str = "",
                  max_target_len: int = 0) -> dict:
    """Length percentiles of one data set, and per row length: how many records fit whole, how
    many keep their whole target with target-preserving truncation, and the ids it skips."""
    lengths = [record_lengths(r, tokenizer, system_prompt) for r in records]
    totals = [n for n, _ in lengths]
    targets = [t for _, t in lengths]
    prompts = [n - t for n, t in lengths]
    out: dict = {"records": len(records), "percentiles": {
        name: {f"p{p}": percentile(xs, p) for p in PERCENTILES}
        for name, xs in (("total", totals), ("prompt", prompts), ("target", targets))}}
    for seq_len in seq_lens:
        fit_whole = sum(n <= seq_len for n in totals)
        skipped: dict[str, str] = {}
        shortened = 0
        for rec, (n, _) in zip(records, lengths):
            if n <= seq_len and not max_target_len:
                continue  # fits as it is: the fast path of fit_chat, not worth re-rendering
            msgs = to_chat(rec)["messages"]
            fit = fit_chat(tokenizer, msgs, seq_len, max_target_len, system_prompt)
            if fit.skip:
                skipped[rec["id"]] = fit.skip
            else:  # as tokenize_records counts: a skipped record is not a shortened one
                shortened += fit.shortened
        kept = len(records) - len(skipped)
        out[str(seq_len)] = {"fit_whole": fit_whole,
                             "right_truncation_cuts_target": len(records) - fit_whole,
                             "target_preserving_keeps_target": kept, "shortened": shortened,
                             "saved": kept - fit_whole, "skipped": skipped}
    return out


def dataset_name(path: str | Path) -> str:
    """``runs/data/aci_bench/train.jsonl`` -> ``aci_bench/train``."""
    p = Path(path)
    return f"{p.parent.name}/{p.stem}" if p.parent.name else p.stem


def format_report(reports: dict[str, dict], seq_lens: list[int]) -> str:
    head = (f"{'data set':<28}{'n':>6}{'p50':>7}{'p90':>7}{'p99':>7}{'max':>7}{'tgt max':>9}"
            + "".join(f"{f'fit@{L}':>10}{f'keep@{L}':>11}" for L in seq_lens))
    lines = [head]
    for name, r in reports.items():
        tot = r["percentiles"]["total"]
        lines.append(f"{name:<28}{r['records']:>6}{tot['p50']:>7}{tot['p90']:>7}{tot['p99']:>7}"
                     f"{tot['p100']:>7}{r['percentiles']['target']['p100']:>9}"
                     + "".join(f"{r[str(L)]['fit_whole']:>10}"
                               f"{r[str(L)]['target_preserving_keeps_target']:>11}"
                               for L in seq_lens))
    lines.append("fit@L: records within L tokens (right-truncation leaves the others' targets "
                 "cut); keep@L: records that keep their whole target with target-preserving "
                 "truncation")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from sparsedoc import fsio
    from sparsedoc.config import ModelCfg
    from sparsedoc.models.load import load_tokenizer, resolve_model_path

    p = argparse.ArgumentParser(prog="sparsedoc lengths", description=__doc__.split("\n\n")[0])
    p.add_argument("files", nargs="+", help="converted unified-schema JSONL files")
    p.add_argument("--model", default="embedded", help="whose tokenizer: embedded, folder, hub id")
    p.add_argument("--seq-lens", default="2048,4096", help="row lengths, comma-separated")
    p.add_argument("--max-target-len", type=int, default=0, help="as data.max_target_len")
    p.add_argument("--system-prompt", default="", help="as data.system_prompt")
    p.add_argument("--out", help="write the full report (with skipped ids) as JSON here")
    args = p.parse_args(argv)
    try:
        seq_lens = [int(x) for x in args.seq_lens.split(",") if x]
    except ValueError:
        p.error(f"--seq-lens: expected integers like 2048,4096, got {args.seq_lens!r}")
    tokenizer = load_tokenizer(resolve_model_path(ModelCfg(name_or_path=args.model)))
    reports = {dataset_name(f): length_report(read_jsonl(f), tokenizer, seq_lens,
                                              args.system_prompt, args.max_target_len)
               for f in args.files}
    print(format_report(reports, seq_lens))
    if args.out:
        fsio.write_json(args.out, {"model": args.model, "seq_lens": seq_lens,
                                   "max_target_len": args.max_target_len, "data": reports})
    return 0
