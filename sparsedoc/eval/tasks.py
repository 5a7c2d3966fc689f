"""Task names -> converted data -> evaluation items.

A task is named after its converter (``sparsedoc prepare NAME ... --out <data_root>/NAME``; the
converters' aliases work: ``cmmlu``, ``medqa_usmle``, ``mts``...), optionally with a split
(``cmexam:validation``, then named ``cmexam_validation``), or given as a path (a ``.jsonl`` file
or a converted folder). Without a split the test split is used, else validation. What is scored
follows from the records:

* MCQ records -> multiple choice (``mcq``);
* chat records whose ``meta.answer`` is yes / no / maybe (PubMedQA) -> multiple choice over the
  three answers, asked as text;
* other chat records -> generation, one item per assistant turn (``generation``).

Group names expand: ``medigen`` = ACI-Bench + MTS-Dialog.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

from sparsedoc.data.schema import read_jsonl, record_kind
from sparsedoc.errors import UserError
from sparsedoc.fsio import file_sha256
from sparsedoc.eval.generation import GenItem, gen_items
from sparsedoc.eval.mcq import MCQItem, is_closed_qa, mcq_item

GROUPS = {"medigen": ["aci_bench", "mts_dialog"]}
SPLIT_PREFERENCE = ("test", "validation")
FEWSHOT_PREFERENCE = ("dev", "train", "validation")
# CMB is one converter for two parts; a folder of either part answers to "cmb".
FOLDER_ALTERNATIVES = {"cmb": ("cmb", "cmb_exam", "cmb_clin")}


class TaskError(UserError, ValueError):
    """A task name or path does not lead to usable data; the message says what to run."""


@dataclass
class Task:
    name: str
    path: Path  # the JSONL file scored
    split: str
    kind: str  # "mcq" or "generation"
    items: list  # MCQItem | GenItem, after the limit
    n_available: int  # items in the file before the limit
    sha256: str
    fewshot_path: Path | None = None
    fewshot: list = field(default_factory=list)  # MCQItem pool for k-shot prompts


def expand_tasks(names: list[str]) -> list[str]:
    out: list[str] = []
    for n in names:
        for t in GROUPS.get(n.lower(), [n]):
            if t not in out:
                out.append(t)
    return out


def _canonical(name: str) -> str:
    from sparsedoc.prep.registry import resolve

    try:
        return resolve(name)
    except KeyError:
        return name


def _split_files(folder: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(folder.glob("*.jsonl"))}


def locate(task: str, data_root: str | Path, split: str = "") -> tuple[str, Path, Path]:
    """``(task name, data file, its folder)`` for a task name, ``name:split`` or a path."""
    spec, _, task_split = task.partition(":") if not Path(task).exists() else (task, "", "")
    split = task_split or split
    p = Path(spec)
    if p.suffix == ".jsonl" and p.is_file():
        name = p.parent.name if p.stem in SPLIT_PREFERENCE + FEWSHOT_PREFERENCE else p.stem
        return name, p, p.parent
    if p.is_dir():
        folder, name = p, p.name
    else:
        name = _canonical(spec)
        root = Path(data_root)
        candidates = [root / f for f in FOLDER_ALTERNATIVES.get(name, (name,))] + [root / spec]
        folder = next((c for c in candidates if c.is_dir()), None)
        if folder is None:
            raise TaskError(f"task {task!r}: no converted data in {candidates[0]}; convert it "
                            f"first: sparsedoc prepare {name} --src <release files> --out "
                            f"{candidates[0]}   (or pass data_root=<folder> or a .jsonl path)")
    files = _split_files(folder)
    default = next((s for s in SPLIT_PREFERENCE if s in files), None)
    if split:
        if split not in files:
            raise TaskError(f"task {task!r}: no split {split!r} in {folder} "
                            f"(found: {sorted(files)})")
        # a non-default split is a task of its own: its results must not overwrite the default's
        return (name if split == default else f"{name}_{split}"), files[split], folder
    if default is None:
        raise TaskError(f"task {task!r}: {folder} has no test or validation split (found: "
                        f"{sorted(files)}); name one as {name}:<split>")
    return name, files[default], folder


def to_items(records: list[dict]) -> tuple[str, list]:
    """The task kind and its items; a file mixing MCQ and generation records is an error."""
    kinds = {"mcq" if record_kind(r) == "mcq" or is_closed_qa(r) else "generation"
             for r in records}
    if len(kinds) != 1:
        raise TaskError("the file mixes multiple-choice and generation records; split it")
    kind = kinds.pop()
    if kind == "mcq":
        return kind, [mcq_item(r) for r in records]
    return kind, [it for r in records for it in gen_items(r)]


def subset(items: list, limit: int, seed: int) -> list:
    """A seeded random subset of ``limit`` items kept in file order (all when 0), so a small
    slice still covers every subject and every model sees the same items."""
    if not limit or limit >= len(items):
        return list(items)
    rng = random.Random(seed)
    keep = sorted(rng.sample(range(len(items)), limit))
    return [items[i] for i in keep]


def load_task(task: str, data_root: str | Path = "runs/data", split: str = "", limit: int = 0,
              seed: int = 0, num_fewshot: int = 0) -> Task:
    """Resolve a task and read its items (and, for k-shot MCQ, its few-shot pool)."""
    name, path, folder = locate(task, data_root, split)
    records = read_jsonl(path)
    if not records:
        raise TaskError(f"task {task!r}: {path} holds no records")
    kind, items = to_items(records)
    eval_split = path.stem
    t = Task(name, path, eval_split, kind, subset(items, limit, seed), len(items), file_sha256(path))
    if num_fewshot and kind == "mcq":
        files = _split_files(folder)
        shot_split = next((s for s in FEWSHOT_PREFERENCE if s in files and s != eval_split), None)
        if shot_split is None:
            raise TaskError(f"task {task!r}: {num_fewshot}-shot needs a dev, train or validation "
                            f"split beside {path.name} in {folder} (found: {sorted(files)})")
        t.fewshot_path = files[shot_split]
        kind_s, pool = to_items(read_jsonl(files[shot_split]))
        if kind_s != "mcq":
            raise TaskError(f"{files[shot_split]}: few-shot pool is not multiple choice")
        t.fewshot = pool
    return t


def item_label(item: MCQItem | GenItem) -> str | None:
    return item.subject if isinstance(item, MCQItem) else item.label
