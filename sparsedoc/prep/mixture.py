"""Mix converted datasets into one training file, by weight, deduplicated, with a manifest.

Config (YAML)::

    seed: 0
    total: 2000            # optional; default: as many as the weights allow without oversampling
    sources:
      - {path: runs/data/toyhom/train.jsonl, weight: 0.5}
      - {path: runs/data/bentsao/train.jsonl, weight: 0.3}
      - {path: runs/data/cmexam/validation.jsonl, weight: 0.2, mcq_to_chat: true}

Per source: ``path`` (a converted JSONL; relative paths are tried against the current folder,
then the config's folder), ``weight`` (> 0; normalised to shares), ``mcq_to_chat`` (turn MCQ
records into instruction records whose answer is the letter plus the explanation when there is
one; default false), ``with_explanation`` (default true), ``name`` (default: the path).

What happens, in order:

1. Every file is read and validated; MCQ records are converted when asked.
2. Deduplication by normalised text (NFKC, case-folded, whitespace removed; all messages, or
   question + options + answer): the first occurrence wins, in config order, within and across
   sources. What remains per source is ``available``.
3. Counts: with ``total``, each source gets its share of it (largest remainder, summing exactly
   to ``total``); a source asked for more than it has is repeated (whole passes, then a seeded
   sample; the repeats get ids ``<id>#2``, ``#3``...; ``repeats`` in the manifest). Without
   ``total``, the largest mixture with exact shares that needs no repeat.
4. A seeded sample of each source, shuffled together, written to ``OUT/train.jsonl``, and
   ``OUT/manifest.json``: the resolved config, per source its sha256, weight, share, counts
   (records, duplicates, available, requested, selected, repeats), labels and the license found
   in its conversion manifest; the output's sha256 and label counts. The training loop copies a
   ``manifest.json`` found beside a training file into the run folder (``load_manifest``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import yaml

from sparsedoc import fsio
from sparsedoc.prep.common import ConvertError
from sparsedoc.prep.records import content_key
from sparsedoc.data.schema import RecordError, mcq_to_chat, read_jsonl, record_kind, \
    record_label, write_jsonl

MANIFEST_KINDS = ("mixture", "conversion")


@dataclass
class MixSource:
    path: str
    weight: float
    mcq_to_chat: bool = False
    with_explanation: bool = True
    name: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.weight, (int, float)) or not self.weight > 0:
            raise ConvertError(f"mixture source {self.path!r}: weight must be > 0, "
                               f"got {self.weight!r}")
        self.name = self.name or self.path


@dataclass
class MixtureConfig:
    sources: list[MixSource]
    seed: int = 0
    total: int | None = None

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConvertError("mixture config: 'sources' is empty")
        if self.total is not None and (not isinstance(self.total, int) or self.total <= 0):
            raise ConvertError(f"mixture config: total must be a positive integer, "
                               f"got {self.total!r}")

    @classmethod
    def from_yaml(cls, path: Path) -> "MixtureConfig":
        """Load and check a mixture config; unknown keys are an error, not ignored."""
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as e:
            raise ConvertError(f"{path}: cannot read the mixture config: {e}") from None
        if not isinstance(raw, dict):
            raise ConvertError(f"{path}: expected a mapping with 'sources'")
        _check_keys(raw, {f.name for f in cls.__dataclass_fields__.values()}, str(path))
        sources = []
        for i, s in enumerate(raw.get("sources") or []):
            if not isinstance(s, dict) or "path" not in s or "weight" not in s:
                raise ConvertError(f"{path}: sources[{i}]: expected {{path: ..., weight: ...}}")
            _check_keys(s, set(MixSource.__dataclass_fields__), f"{path}: sources[{i}]")
            sources.append(MixSource(**s))
        return cls(sources=sources, seed=raw.get("seed", 0), total=raw.get("total"))


def _check_keys(raw: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise ConvertError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def allocate(weights: list[float], available: list[int], total: int | None) -> list[int]:
    """Records to take from each source so that counts follow the weights.

    With ``total``: largest-remainder shares of ``total`` (may exceed ``available``: repeats).
    Without: the largest counts in exact proportion that no source runs out of.
    """
    shares = [w / sum(weights) for w in weights]
    if total is None:
        scale = min(a / s for a, s in zip(available, shares))
        return [min(a, math.floor(scale * s + 1e-9)) for a, s in zip(available, shares)]
    raw = [total * s for s in shares]
    counts = [math.floor(r) for r in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: (-(raw[i] - counts[i]), i))
    for i in by_remainder[: total - sum(counts)]:
        counts[i] += 1
    return counts


def _resolve(path: str, config_dir: Path | None) -> Path:
    p = Path(path)
    if p.is_absolute() or p.exists() or config_dir is None:
        return p
    return config_dir / p


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _source_provenance(path: Path) -> dict | None:
    """License and origin from the conversion manifest beside a converted file, if any."""
    manifest = path.parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        m = load_manifest(manifest)
    except ConvertError:
        return None
    keys = ("kind", "source", "license", "non_commercial", "src", "hf")
    return {k: m.get(k) for k in keys}


def _sample(records: list[dict], n: int, rng: random.Random) -> tuple[list[dict], int]:
    """``n`` records: whole passes over ``records``, then a seeded sample; (picked, repeats)."""
    if not records or n == 0:
        return [], 0
    passes, rest = divmod(n, len(records))
    picked = []
    for p in range(passes):
        picked += [r if p == 0 else {**r, "id": f"{r['id']}#{p + 1}"} for r in records]
    tail = rng.sample(records, rest)
    picked += [r if passes == 0 else {**r, "id": f"{r['id']}#{passes + 1}"} for r in tail]
    return picked, max(0, n - len(records))


def build_mixture(config: MixtureConfig, out: Path, config_path: Path | None = None) -> dict:
    """Write ``OUT/train.jsonl`` and ``OUT/manifest.json``; return the manifest.

    Raises:
        ConvertError: a missing or invalid source file (named), or nothing left to mix.
    """
    t0 = time.perf_counter()
    config_dir = Path(config_path).parent if config_path else None
    seen: dict[str, str] = {}
    pools, entries = [], []
    for src in config.sources:
        path = _resolve(src.path, config_dir)
        if not path.is_file():
            raise ConvertError(f"mixture source {src.path!r}: no such file ({path})")
        try:
            records = read_jsonl(path)
        except RecordError as e:
            raise ConvertError(f"mixture source {src.path!r}: {e}") from None
        within = across = 0
        kept = []
        for rec in records:
            if src.mcq_to_chat and record_kind(rec) == "mcq":
                rec = mcq_to_chat(rec, with_explanation=src.with_explanation)
            key = content_key(rec)
            if key in seen:
                within += seen[key] == src.name
                across += seen[key] != src.name
                continue
            seen[key] = src.name
            kept.append(rec)
        pools.append(kept)
        entries.append({"name": src.name, "path": src.path, "resolved_path": str(path),
                        "sha256": _sha256(path), "weight": src.weight,
                        "mcq_to_chat": src.mcq_to_chat, "records": len(records),
                        "duplicates_within": within, "duplicates_across": across,
                        "available": len(kept), "provenance": _source_provenance(path)})
    if any(not pool for pool in pools):
        empty = [e["name"] for e, pool in zip(entries, pools) if not pool]
        raise ConvertError(f"mixture: nothing left to sample from {empty} after deduplication")
    counts = allocate([s.weight for s in config.sources], [len(p) for p in pools], config.total)
    mixed = _select(config, pools, entries, counts)
    out = Path(out)
    write_jsonl(out / "train.jsonl", mixed)
    manifest = {
        "kind": "mixture", "created_by": "sparsedoc.prep.mixture",
        "config": {"seed": config.seed, "total": config.total,
                   "sources": [asdict(s) for s in config.sources]},
        "config_path": str(config_path) if config_path else None,
        "config_sha256": _sha256(Path(config_path)) if config_path else None,
        "dedup": {"normalization": "NFKC, case-folded, whitespace removed; first occurrence "
                                   "wins in config order",
                  "removed": sum(e["duplicates_within"] + e["duplicates_across"]
                                 for e in entries)},
        "sources": entries,
        "non_commercial": any((e["provenance"] or {}).get("non_commercial") for e in entries),
        "output": {"path": "train.jsonl", "records": len(mixed),
                   "sha256": _sha256(out / "train.jsonl"),
                   "labels": dict(Counter(record_label(r) or "(none)" for r in mixed)
                                  .most_common())},
        "seconds": round(time.perf_counter() - t0, 3)}
    fsio.write_json(out / "manifest.json", manifest)
    return manifest


def _select(config: MixtureConfig, pools: list[list[dict]], entries: list[dict],
            counts: list[int]) -> list[dict]:
    mixed, used_ids = [], set()
    for i, (pool, entry, n) in enumerate(zip(pools, entries, counts)):
        picked, repeats = _sample(pool, n, random.Random(f"{config.seed}:{i}"))
        entry.update(requested=n, selected=len(picked), repeats=repeats,
                     share=round(n / max(1, sum(counts)), 6),
                     labels=dict(Counter(record_label(r) or "(none)" for r in picked)
                                 .most_common()))
        for rec in picked:  # two sources may reuse an id (the same set converted twice)
            if rec["id"] in used_ids:
                rec = {**rec, "id": f"{rec['id']}@{i}"}
            used_ids.add(rec["id"])
            mixed.append(rec)
    random.Random(config.seed).shuffle(mixed)
    return mixed


def load_manifest(path: str | Path) -> dict:
    """A data manifest (``manifest.json`` of a mixture or a conversion), checked.

    Args:
        path: the manifest file, or the folder holding it.

    Raises:
        ConvertError: missing, not JSON, or not a sparsedoc data manifest.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConvertError(f"{path}: cannot read the manifest: {e.strerror or e}") from None
    except ValueError as e:
        raise ConvertError(f"{path}: not valid JSON: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("kind") not in MANIFEST_KINDS:
        raise ConvertError(f"{path}: not a data manifest (expected 'kind' in {MANIFEST_KINDS})")
    need = ("sources", "output") if manifest["kind"] == "mixture" else ("inputs", "outputs")
    missing = [k for k in need if k not in manifest]
    if missing:
        raise ConvertError(f"{path}: {manifest['kind']} manifest lacks {missing}")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """``prepare mixture CONFIG.yaml --out DIR``."""
    p = argparse.ArgumentParser(prog="sparsedoc prepare mixture",
                                description="Mix converted datasets by weight, deduplicated.")
    p.add_argument("config", type=Path, help="mixture YAML (see data_prep.mixture)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    args = p.parse_args(argv)
    try:
        manifest = build_mixture(MixtureConfig.from_yaml(args.config), args.out, args.config)
    except ConvertError as e:
        print(f"error: mixture: {e}", file=sys.stderr)
        return 2
    print(f"mixture: wrote {args.out / 'train.jsonl'} ({manifest['output']['records']} records, "
          f"{manifest['dedup']['removed']} duplicates removed)"
          + ("  [includes NON-COMMERCIAL data]" if manifest["non_commercial"] else ""))
    for s in manifest["sources"]:
        print(f"  {s['name']}: weight {s['weight']} -> {s['selected']} of {s['available']} "
              f"available ({s['records']} read, {s['duplicates_within']} + "
              f"{s['duplicates_across']} duplicates)" + (f", {s['repeats']} repeated"
                                                          if s["repeats"] else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
