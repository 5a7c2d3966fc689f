"""From JSONL files to resumable, rank-sharded batches.

``ResumableSampler`` is a seeded ``DistributedSampler`` that can start mid-epoch: the order of an
epoch depends only on (seed, epoch), so a resumed run sees exactly the batches an uninterrupted
run would have seen after the same number of steps.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler

from sparsedoc.config import ConfigError, DataCfg
from sparsedoc.data.cache import CachedFiles, TokenizedRows, TokenizeSettings, tokenized_files
from sparsedoc.data.collate import PackCollator, PadCollator, Seq2SeqCollator, pack_examples
from sparsedoc.data.schema import RecordError, read_jsonl, routing_label
from sparsedoc.data.tokenize import (TokenizedExample, TokenizeStats, tokenize_records,
                                     tokenize_seq2seq)
from sparsedoc.resources import resolve_path


class ResumableSampler(Sampler[int]):
    """Seeded shuffle per epoch, sharded across ranks, dropping the ragged tail so every rank
    runs the same number of batches (ZeRO-3 collectives would hang otherwise)."""

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 seed: int = 0, shuffle: bool = True, lengths: list[int] | None = None):
        self.size, self.batch_size = size, batch_size
        self.lengths = lengths  # given: batch rows of similar length (less padding)
        self.rank, self.world_size = rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.epoch, self.start_batch = 0, 0
        self.batches_per_epoch = size // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(f"train.micro_batch_size: {size} training rows are fewer than one "
                              f"global micro-batch ({batch_size} x {world_size} ranks); lower "
                              f"train.micro_batch_size or add records to data.train_files")

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def epoch_indices(self) -> list[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
            order = torch.randperm(self.size, generator=g).tolist()
        else:
            order = list(range(self.size))
        global_bs = self.batch_size * self.world_size
        used = self.batches_per_epoch * global_bs
        order = order[:used]
        if self.lengths is not None:
            order = self._group_by_length(order, global_bs, g if self.shuffle else None)
        # consecutive global batches; rank r takes every world_size-th row of each
        return order[self.rank::self.world_size]

    def _group_by_length(self, order: list[int], global_bs: int, g) -> list[int]:
        """Sort within windows of 16 global batches by length, cut into global batches, and
        shuffle the batch order: rows of a batch have similar lengths, epochs stay random."""
        window = global_bs * 16
        flat: list[int] = []
        for i in range(0, len(order), window):
            flat += sorted(order[i:i + window], key=lambda j: -self.lengths[j])
        batches = [flat[i:i + global_bs] for i in range(0, len(flat), global_bs)]
        perm = torch.randperm(len(batches), generator=g).tolist() if g is not None else \
            range(len(batches))
        return [j for b in perm for j in batches[b]]

    def __iter__(self) -> Iterator[int]:
        idx = self.epoch_indices()
        yield from idx[self.start_batch * self.batch_size:]

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size


class ListDataset(torch.utils.data.Dataset):
    def __init__(self, rows: list[TokenizedExample]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> TokenizedExample:
        return self.rows[i]


@dataclass
class PreparedData:
    train: list[TokenizedExample]
    eval: list[TokenizedExample]
    label_vocab: dict[str, int]
    stats: dict
    manifests: list[Path]  # data manifests found beside the training files (mixtures)


def load_records(files: list[str], encoding: str = "utf-8", key: str = "") -> list[dict]:
    """The records of ``files`` in order. With ``key`` (the config key that names them), a
    file without a single record is an error naming it: an empty split is a mistake, not a
    run with nothing to learn or measure."""
    records: list[dict] = []
    for f in files:
        got = read_jsonl(f, encoding=encoding)
        if key and not got:
            raise RecordError(f"{key}: {f} holds no records (an empty split); expected unified "
                              f"JSONL, one record a line")
        records += got
    return records


def split_records(cfg: DataCfg, seed: int) -> tuple[list[dict], list[dict]]:
    """The run's (train, eval) records: ``eval_files``, or a seeded ``eval_fraction`` split."""
    if not cfg.train_files:
        raise ConfigError("data.train_files: expected at least one JSONL file")
    train_records = load_records(cfg.train_files, cfg.encoding, "data.train_files")
    eval_records = (load_records(cfg.eval_files, cfg.encoding, "data.eval_files")
                    if cfg.eval_files else [])
    if not eval_records and cfg.eval_fraction > 0:
        train_idx, eval_idx = _held_out_split(len(train_records), cfg.eval_fraction, seed)
        train_records, eval_records = ([train_records[i] for i in train_idx],
                                       [train_records[i] for i in eval_idx])
    return train_records, eval_records


AUTO_CACHE_BYTES = 16 << 20  # data.tokenize_cache=auto: the cache pays off from about here


def uses_tokenize_cache(cfg: DataCfg) -> bool:
    if cfg.tokenize_cache != "auto":
        return cfg.tokenize_cache == "always"
    files = [resolve_path(f) for f in cfg.train_files + cfg.eval_files]
    return sum(f.stat().st_size for f in files if f.is_file()) >= AUTO_CACHE_BYTES


def prepare_data(cfg: DataCfg, tokenizer, seed: int, progress: bool = False,
                 seq2seq: bool = False) -> PreparedData:
    """Read, split (if asked), tokenize (target-preserving truncation) and optionally pack the
    train and eval sets. ``stats`` is the run's data report: counts per split, and every
    skipped record's id with the reason. Large sets go through the tokenize cache
    (``data.tokenize_cache``, sparsedoc/data/cache.py), which gives the same rows.
    ``seq2seq``: an encoder-decoder model's source/target rows (``tokenize_seq2seq``)."""
    if not cfg.train_files:
        raise ConfigError("data.train_files: expected at least one JSONL file")
    if seq2seq:
        return _prepare_seq2seq(cfg, tokenizer, seed)
    if uses_tokenize_cache(cfg):
        return _prepare_cached(cfg, tokenizer, seed)
    train_records, eval_records = split_records(cfg, seed)
    labels = sorted({lab for r in train_records + eval_records if (lab := routing_label(r))})
    kw = dict(max_seq_len=cfg.max_seq_len, max_target_len=cfg.max_target_len,
              system_prompt=cfg.system_prompt,
              mcq_with_explanation=cfg.mcq_with_explanation, progress=progress)
    train, train_stats = tokenize_records(train_records, tokenizer, **kw)
    evals, eval_stats = tokenize_records(eval_records, tokenizer, **kw) if eval_records else (
        [], TokenizeStats())
    train_labels = Counter(routing_label(r) or "" for r in train_records)
    return _prepared(cfg, train, evals, labels, train_labels, train_stats, eval_stats)


def _prepare_seq2seq(cfg: DataCfg, tokenizer, seed: int) -> PreparedData:
    """``prepare_data`` for an encoder-decoder model: plain source/target rows, in memory."""
    if cfg.packing:
        raise ConfigError("data.packing=true: packed rows need a decoder-only model; the model is "
                          "an encoder-decoder (seq2seq), whose rows are padded: set "
                          "data.packing=false")
    if cfg.tokenize_cache == "always":
        raise ConfigError("data.tokenize_cache=always: the tokenize cache holds chat-template "
                          "rows; an encoder-decoder model tokenizes in memory: set it to auto")
    train_records, eval_records = split_records(cfg, seed)
    labels = sorted({lab for r in train_records + eval_records if (lab := routing_label(r))})
    kw = dict(max_source_len=cfg.max_source_len or cfg.max_seq_len,
              max_target_len=cfg.max_target_len or cfg.max_seq_len,
              source_prefix=cfg.source_prefix, mcq_with_explanation=cfg.mcq_with_explanation)
    train, train_stats = tokenize_seq2seq(train_records, tokenizer, **kw)
    evals, eval_stats = tokenize_seq2seq(eval_records, tokenizer, **kw) if eval_records else (
        [], TokenizeStats())
    train_labels = Counter(routing_label(r) or "" for r in train_records)
    return _prepared(cfg, train, evals, labels, train_labels, train_stats, eval_stats)


def _held_out_split(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) record numbers of a seeded ``eval_fraction`` split, both in file order."""
    rng = random.Random(seed)
    order = list(range(n))
    rng.shuffle(order)
    n_eval = max(1, int(n * fraction))
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def _prepare_cached(cfg: DataCfg, tokenizer, seed: int) -> PreparedData:
    """``prepare_data`` from cached tables: no record is held in Python, the training rows are
    read from the memory map as batches are drawn."""
    settings = TokenizeSettings(cfg.max_seq_len, cfg.max_target_len, cfg.system_prompt,
                                cfg.mcq_with_explanation, cfg.encoding)
    num_proc = cfg.num_proc or min(8, os.cpu_count() or 1)

    def load(files: list[str], key: str) -> CachedFiles:
        cached = tokenized_files(files, tokenizer, settings, num_proc, cfg.cache_dir)
        for f, n in zip(files, cached.rows_per_file):
            if n == 0:
                raise RecordError(f"{key}: {f} holds no records (an empty split); expected "
                                  f"unified JSONL, one record a line")
        return cached

    train_set = load(cfg.train_files, "data.train_files")
    eval_set = load(cfg.eval_files, "data.eval_files") if cfg.eval_files else None
    train_idx, eval_idx = list(range(len(train_set))), None
    if eval_set is None and cfg.eval_fraction > 0:
        train_idx, eval_idx = _held_out_split(len(train_set), cfg.eval_fraction, seed)
        eval_set = train_set
    record_labels = train_set.column("record_label", train_idx)
    eval_labels = eval_set.column("record_label", eval_idx) if eval_set is not None else []
    labels = sorted({lab for lab in record_labels + eval_labels if lab})
    train = train_set.kept(train_idx)
    evals = list(eval_set.kept(eval_idx)) if eval_set is not None else []
    train_stats = train_set.stats(train_idx)
    eval_stats = eval_set.stats(eval_idx) if eval_set is not None else TokenizeStats()
    train_labels = Counter(lab or "" for lab in record_labels)
    return _prepared(cfg, train, evals, labels, train_labels, train_stats, eval_stats)


def _prepared(cfg: DataCfg, train, evals, labels: list[str], train_labels: Counter,
              train_stats: TokenizeStats, eval_stats: TokenizeStats) -> PreparedData:
    if not train:
        why = "; ".join(f"{i}: {r}" for i, r in list(train_stats.skipped.items())[:3])
        fix = ("check the model's chat template" if "tokenize as a prefix" in why
               else "raise data.max_seq_len or data.max_target_len")
        raise RecordError(f"data.train_files: every record was skipped while tokenizing, none "
                          f"is left to train on ({why}); {fix}")
    if cfg.packing:
        train = pack_examples(list(train), cfg.max_seq_len)
    label_vocab = {lab: i for i, lab in enumerate(labels)}
    manifests = [p for f in cfg.train_files
                 if (p := resolve_path(f).parent / "manifest.json").is_file()]
    stats = {"train": train_stats.as_dict(), "eval": eval_stats.as_dict(),
             "train_rows": len(train), "labels": label_vocab,
             "train_labels": dict(train_labels),
             "skipped_ids": {"train": train_stats.skipped, "eval": eval_stats.skipped}}
    return PreparedData(train, evals, label_vocab, stats, manifests)


def make_collator(cfg: DataCfg, tokenizer, label_vocab: dict[str, int],
                  seq2seq: bool = False) -> PadCollator:
    cls = Seq2SeqCollator if seq2seq else PackCollator if cfg.packing else PadCollator
    return cls(tokenizer.pad_token_id, label_vocab)


def train_loader(rows: list[TokenizedExample], collate: PadCollator, batch_size: int, rank: int,
                 world_size: int, seed: int, num_workers: int = 0,
                 group_by_length: bool = True) -> DataLoader:
    lengths = None
    if group_by_length:  # cached rows know their lengths without reading the tokens
        lengths = rows.lengths() if isinstance(rows, TokenizedRows) else [
            len(r.input_ids) for r in rows]
    sampler = ResumableSampler(len(rows), batch_size, rank, world_size, seed, lengths=lengths)
    # Own generator: creating a DataLoader iterator draws a seed from it, and drawing from the
    # global RNG instead would shift the dropout stream of a resumed run.
    return DataLoader(ListDataset(rows), batch_size=batch_size, sampler=sampler,
                      collate_fn=collate, num_workers=num_workers, drop_last=True,
                      generator=torch.Generator().manual_seed(seed))


def eval_batches(rows: list[TokenizedExample], collate: PadCollator, batch_size: int, rank: int,
                 world_size: int, max_batches: int = 0) -> list[dict]:
    """This rank's eval batches; every rank gets the same number of batches, so collective ops
    inside the forward (ZeRO-3) never wait on a missing rank. The rows that fill the last batch
    carry no target tokens and ``record_ids`` -1: readers of routing and gate statistics count
    ``record_ids >= 0`` tokens only."""
    if not rows:
        return []
    per_rank = -(-len(rows) // world_size)
    n_batches = -(-per_rank // batch_size)
    if max_batches:
        n_batches = min(n_batches, max_batches)
    mine = rows[rank::world_size]
    filler = TokenizedExample(rows[0].input_ids, [-100] * len(rows[0].input_ids), None, "<pad>",
                              filler=True)
    mine = mine + [filler] * (n_batches * batch_size - len(mine))
    return [collate(mine[i * batch_size:(i + 1) * batch_size]) for i in range(n_batches)]


def calibration_batches(rows: list[TokenizedExample], collate: PadCollator, n_batches: int,
                        batch_size: int, rank: int, world_size: int, seed: int) -> list[dict]:
    """This rank's share of a seeded sample across the whole training set, for a method that
    calibrates before training (the MoE's router initialisation). Training files are often
    sorted by source or label, so the first batches would not do; the sample is the same on
    every rank, and each rank takes its own rows of it."""
    n = min(len(rows), n_batches * batch_size * world_size)
    sample = random.Random(seed).sample(rows, n)
    return eval_batches(sample, collate, batch_size, rank, world_size)

