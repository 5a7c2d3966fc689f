"""The data-path benchmark: a generated million-record corpus through the tokenize cache.

    sparsedoc benchmark --data                      # 1M records; ~1 h on 2 CPU cores, once
    sparsedoc benchmark --data --records 20000      # a quick look

The corpus is drawn from the shared samples as released (converted with ``sparsedoc prepare``):
each generated record copies a randomly chosen real record's structure and text lengths, and
rotates each message's text by a random offset, so the token-length distribution is the
samples' own while no two records are the same text. It reports, side by side in one run:

- tokenization throughput into the cache (records/s, tokens/s) with 1 process and with
  ``num_proc`` processes, on the same records;
- for a 2-rank ``deepspeed`` LoRA run on the embedded default, the time from launch to the
  first optimizer step and each rank's peak RSS, on the 1k-record and the full corpus with the
  cache warm (and the cold first start of the full corpus);

and writes ``<out>/bench_data.{json,md}``. Targets (issue #24): warm start <= 1.2x the 1k start,
peak RSS per rank <= 1.2x, ``num_proc=2`` tokenization >= 1.6x one process.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from sparsedoc import fsio

# (converter, folder under the shared data, converted split) — chat, notes, exams, QA
SOURCES = [("chinese_medical_dialogue", "chinese_medical_dialogue", "train"),
           ("bentsao", "bentsao_huatuo_llama_med", "train"),
           ("cmexam", "cmexam", "validation"),
           ("mts_dialog", "mts_dialog", "train"),
           ("pubmedqa", "pubmedqa", "train")]


def real_records(shared: Path, work: Path) -> list[dict]:
    """The shared samples, converted to the unified schema."""
    from sparsedoc.data.schema import read_jsonl
    from sparsedoc.prep.cli import main as prepare

    records = []
    for name, folder, split in SOURCES:
        out = work / name
        if prepare([name, "--src", str(shared / folder), "--out", str(out)]) != 0:
            raise SystemExit(f"sparsedoc prepare {name} failed")
        files = sorted(out.glob(f"{split}.jsonl")) or sorted(out.glob("*.jsonl"))
        records += read_jsonl(files[0])
    return records


def _rotate(text: str, rng: random.Random) -> str:
    """``text`` cut at a random point and its two parts swapped; stripped, as converters do."""
    k = rng.randrange(len(text)) if text else 0
    return (text[k:] + text[:k]).strip() or text


def synthetic(record: dict, i: int, rng: random.Random) -> dict:
    """``record`` with a new id and every text field rotated: same lengths, different text."""
    rec = json.loads(json.dumps(record))
    rec["id"] = f"bench-{i:08d}"
    for m in rec.get("messages", []):
        m["content"] = _rotate(m["content"], rng)
    if "question" in rec:
        rec["question"] = _rotate(rec["question"], rng)
    return rec


def write_corpus(path: Path, records: list[dict], n: int, seed: int) -> Path:
    if path.is_file():
        return path
    rng = random.Random(seed)
    fsio.write_lines(path, (json.dumps(synthetic(rng.choice(records), i, rng),
                                       ensure_ascii=False) for i in range(n)))
    return path


def tokenize_throughput(corpus: Path, num_proc: int, tokenizer, max_seq_len: int) -> dict:
    """Build the cache of ``corpus`` from nothing with ``num_proc`` processes, timed."""
    from sparsedoc.data.cache import TokenizeSettings, tokenized_files

    root = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    try:
        t0 = time.perf_counter()
        cached = tokenized_files([str(corpus)], tokenizer, TokenizeSettings(max_seq_len),
                                 num_proc, root)
        seconds = time.perf_counter() - t0
        tokens = sum(cached.column("length"))
        return {"num_proc": num_proc, "records": len(cached), "seconds": seconds,
                "records_per_s": len(cached) / seconds, "tokens_per_s": tokens / seconds}
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _descendants_rss(proc) -> dict[int, int]:
    import psutil

    out = {}
    try:
        for p in psutil.Process(proc.pid).children(recursive=True):
            try:
                if any(a.startswith("--local_rank") for a in p.cmdline()):  # a rank
                    out[p.pid] = p.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
    except psutil.NoSuchProcess:
        pass
    return out


def start_run(corpus: Path, out: Path, cache_dir: Path, max_seq_len: int, ranks: int = 2) -> dict:
    """A 2-rank LoRA run on ``corpus``: seconds from launch to the first optimizer step (the
    first line of metrics.jsonl; logged at every step) and each rank's peak RSS, sampled."""
    from sparsedoc.recipes import train_command

    if out.exists():
        shutil.rmtree(out)
    cmd = train_command("lora", [
           f"data.train_files=[{corpus}]", "data.eval_files=[]", "data.tokenize_cache=always",
           f"data.cache_dir={cache_dir}", f"data.max_seq_len={max_seq_len}", "train.max_steps=2",
           "train.micro_batch_size=2", "train.log_every=1", "train.eval_every=0",
           "train.save_every=1000", f"train.output_dir={out}", "logging.wandb=false"], gpus=ranks)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(out.parent / f"{out.name}.log", "w")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    peak: dict[int, int] = {}
    first_step = None
    metrics = out / "metrics.jsonl"
    while proc.poll() is None:
        for pid, rss in _descendants_rss(proc).items():
            peak[pid] = max(peak.get(pid, 0), rss)
        if first_step is None and metrics.is_file() and metrics.stat().st_size:
            first_step = time.perf_counter() - t0
        time.sleep(0.2)
    log.close()
    if proc.returncode != 0:
        raise SystemExit(f"the 2-rank run on {corpus} failed: see {log.name}")
    ranks_rss = sorted(peak.values(), reverse=True)
    return {"records": sum(1 for _ in open(corpus, "rb")), "seconds_to_first_step": first_step,
            "seconds_total": time.perf_counter() - t0,
            "peak_rss_mib_per_rank": [r / 2**20 for r in ranks_rss]}


def markdown(res: dict) -> str:
    tp = res["tokenize"]
    one, many = tp[0], tp[-1]
    lines = [f"# Data path on {res['records']:,} generated records", "",
             f"Corpus drawn from the shared samples ({', '.join(s[0] for s in SOURCES)}); "
             f"{res['corpus_mib']:.0f} MiB of JSONL; data.max_seq_len={res['max_seq_len']}. "
             f"Machine: {os.cpu_count()} CPU cores.", "",
             "| tokenize into the cache | records | s | records/s | tokens/s |",
             "|---|---|---|---|---|"]
    for t in tp:
        lines.append(f"| num_proc={t['num_proc']} | {t['records']:,} | {t['seconds']:.1f} | "
                     f"{t['records_per_s']:,.0f} | {t['tokens_per_s']:,.0f} |")
    speedup = many["records_per_s"] / one["records_per_s"]
    lines += ["", f"num_proc={many['num_proc']} vs 1: x{speedup:.2f}"
              " (target >= 1.6)", "",
              "| 2-rank LoRA start | records | s to first step | peak RSS per rank (MiB) |",
              "|---|---|---|---|"]
    for name, s in res["starts"].items():
        rss = ", ".join(f"{r:,.0f}" for r in s["peak_rss_mib_per_rank"])
        lines.append(f"| {name} | {s['records']:,} | {s['seconds_to_first_step']:.1f} | {rss} |")
    small, warm = res["starts"]["1k"], res["starts"]["full, cache warm"]
    start_ratio = warm["seconds_to_first_step"] / small["seconds_to_first_step"]
    lines += ["", f"warm start vs 1k: x{start_ratio:.2f}"
              " (target <= 1.2); peak RSS per rank vs 1k: "
              f"x{max(warm['peak_rss_mib_per_rank']) / max(small['peak_rss_mib_per_rank']):.2f}"
              " (target <= 1.2)", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="sparsedoc benchmark --data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000)
    p.add_argument("--tokenize-records", type=int, default=50_000,
                   help="records timed for the 1-process vs num_proc comparison")
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--max-seq-len", type=int, default=512, help="data.max_seq_len of every step")
    p.add_argument("--shared", default="../shared/data", help="the shared samples, as released")
    p.add_argument("--out", default="runs/bench_data")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    from sparsedoc.config import ModelCfg
    from sparsedoc.models.load import load_tokenizer, resolve_model_path

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = real_records(Path(args.shared), out / "converted")
    corpus = write_corpus(out / f"corpus_{args.records}.jsonl", records, args.records, args.seed)
    small = write_corpus(out / "corpus_1000.jsonl", records, 1000, args.seed + 1)
    sub = write_corpus(out / f"corpus_{args.tokenize_records}.jsonl", records,
                       args.tokenize_records, args.seed + 2)
    tokenizer = load_tokenizer(resolve_model_path(ModelCfg()))
    res = {"records": args.records, "corpus_mib": corpus.stat().st_size / 2**20,
           "tokenize": [tokenize_throughput(sub, n, tokenizer, args.max_seq_len)
                        for n in (1, args.num_proc)]}
    print(json.dumps(res["tokenize"], indent=1), flush=True)
    cache = out / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    starts = {}
    n = args.max_seq_len
    starts["1k"] = start_run(small, out / "run_1k", cache, n)  # builds the 1k cache
    starts["1k"] = start_run(small, out / "run_1k", cache, n)  # warm, as the full corpus below
    starts["full, cache cold"] = start_run(corpus, out / "run_full", cache, n)
    starts["full, cache warm"] = start_run(corpus, out / "run_full", cache, n)
    res["max_seq_len"] = n
    res["starts"] = starts
    fsio.write_json(out / "bench_data.json", res)
    fsio.write_text(out / "bench_data.md", markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
