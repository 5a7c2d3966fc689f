"""Render facts.py into the demo dataset: ``python -m sparsedoc.prep.demo.build [--out DIR]``.

Every fact becomes four records (en/zh chat, en/zh MCQ). The split is by fact, not by record: a
seeded ~15% of each department's facts go to eval with all four renderings, so eval loss measures
held-out facts rather than memorised paraphrases. Holding out per department (and, since a fact's
renderings stay together, per language) puts every department and language in both splits.
Everything is seeded and written in a fixed order, so rebuilding gives identical bytes
(tests/test_demo_data.py checks this against the shipped files).
"""

from __future__ import annotations

import argparse
import random
from collections import Counter
from pathlib import Path

from sparsedoc.prep.demo.facts import FACTS, Fact, Side
from sparsedoc.data.schema import validate_record, write_jsonl

SEED = 2024
EVAL_FRACTION = 0.15
SOURCE = "sparsedoc-demo"
LANGS = ("en", "zh")
KINDS = ("qa", "mcq")
SPLITS = ("train", "eval")
HERE = Path(__file__).resolve().parent


def eval_indices(dept: str, n_facts: int) -> set[int]:
    """0-based indices of the department's facts held out for eval (seeded per department)."""
    k = max(1, round(n_facts * EVAL_FRACTION))
    return set(random.Random(f"{SEED}:split:{dept}").sample(range(n_facts), k))


def chat_record(rid: str, dept: str, lang: str, side: Side) -> dict:
    return {"id": rid,
            "messages": [{"role": "user", "content": side.q},
                         {"role": "assistant", "content": side.a}],
            "meta": {"source": SOURCE, "task": "qa", "lang": lang, "label": dept}}


def answer_slots(dept: str, lang: str, n_facts: int, shift: int) -> list[int]:
    """Where each fact's correct option goes: a seeded permutation of A, B, C, D, A, ... so the
    answer letters are balanced and always guessing one letter scores about 25%. ``shift``
    rotates which letter comes up short when ``n_facts`` is not a multiple of 4."""
    slots = [(i + shift) % 4 for i in range(n_facts)]
    random.Random(f"{SEED}:answers:{dept}:{lang}").shuffle(slots)
    return slots


def mcq_record(rid: str, dept: str, lang: str, side: Side, slot: int) -> dict:
    """Distractors shuffled with a per-record seed, the correct option put at ``slot``."""
    texts = list(side.wrong)
    random.Random(f"{SEED}:options:{rid}").shuffle(texts)
    texts.insert(slot, side.right)
    return {"id": rid, "question": side.stem, "options": dict(zip("ABCD", texts)),
            "answer": "ABCD"[slot], "explanation": side.a,
            "meta": {"source": SOURCE, "subject": dept, "label": dept, "lang": lang}}


def render_fact(dept: str, number: int, fact: Fact, slots: dict[str, int]) -> list[dict]:
    """The four records of one fact, ids like ``demo-cardiology-07-en-qa``."""
    out = []
    for kind in KINDS:
        for lang in LANGS:
            rid = f"demo-{dept}-{number:02d}-{lang}-{kind}"
            side = getattr(fact, lang)
            record = (chat_record(rid, dept, lang, side) if kind == "qa"
                      else mcq_record(rid, dept, lang, side, slots[lang]))
            validate_record(record, rid)
            out.append(record)
    return out


def build() -> dict[str, list[dict]]:
    """Split name -> records, in department then fact order."""
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for d, (dept, facts) in enumerate(FACTS.items()):
        held_out = eval_indices(dept, len(facts))
        slots = {lang: answer_slots(dept, lang, len(facts), 2 * d + j)
                 for j, lang in enumerate(LANGS)}
        for i, fact in enumerate(facts):
            records = render_fact(dept, i + 1, fact, {lang: slots[lang][i] for lang in LANGS})
            splits["eval" if i in held_out else "train"].extend(records)
    return splits


def record_key(record: dict) -> tuple[str, str, str]:
    """(department, lang, kind) of a demo record, for the counts table."""
    return record["meta"]["label"], record["meta"]["lang"], record["id"].rsplit("-", 1)[1]


def counts_table(splits: dict[str, list[dict]]) -> str:
    cols = [(s, lang, kind) for s in SPLITS for lang in LANGS for kind in KINDS]
    counts = {s: Counter(record_key(r) for r in recs) for s, recs in splits.items()}
    head = f"{'department':<20}" + "".join(f"{s}/{lang}/{kind}".rjust(14) for s, lang, kind in cols)
    lines = [head]
    for dept in FACTS:
        lines.append(f"{dept:<20}" + "".join(
            str(counts[s][(dept, lang, kind)]).rjust(14) for s, lang, kind in cols))
    lines.append(f"{'total':<20}" + "".join(
        str(sum(counts[s][(d, lang, kind)] for d in FACTS)).rjust(14) for s, lang, kind in cols))
    lines.append("records: " + ", ".join(f"{s}={len(splits[s])}" for s in SPLITS))
    return "\n".join(lines)


def write(out_dir: str | Path = HERE) -> dict[str, list[dict]]:
    """Build and write ``train.jsonl`` and ``eval.jsonl`` into ``out_dir``."""
    splits = build()
    for name, records in splits.items():
        write_jsonl(Path(out_dir) / f"{name}.jsonl", records)
    return splits


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(HERE), help="output folder (default: this package)")
    args = parser.parse_args(argv)
    splits = write(args.out)
    print(counts_table(splits))
    print(f"wrote {args.out}/train.jsonl and {args.out}/eval.jsonl")


if __name__ == "__main__":
    main()
