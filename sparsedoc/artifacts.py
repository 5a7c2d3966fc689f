"""What a path is: a training run, a checkpoint, an adapter, or a model folder / hub id.

The one place that recognises sparsedoc's folders and parses their metadata files. Loading
(``sparsedoc.loader``), export, generation, lineage and the model cards ask ``locate`` instead of
checking files themselves. Imports no torch, so a CLI can answer "what is this" at once.

Layouts::

    <run>/config.yaml, summary.json, checkpoints/step-000050/   a training run
    <run>/checkpoints/step-000050/trainer_state.json, config.yaml, adapter/   a checkpoint
    <folder>/adapter_config.json (+ weights)                   an adapter: peft, or
                                                               "format": "sparsedoc-lora-moe"
    <folder>/config.json                                       a model (base or export)
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

from sparsedoc.errors import UserError

STEP_RE = re.compile(r"^step-(\d+)$")
MOE_FORMAT = "sparsedoc-lora-moe"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"
LATEST = "latest"  # checkpoints/latest: the newest checkpoint's folder name
RUN_CONFIG = "config.yaml"
RUN_SUMMARY = "summary.json"  # written last by training: its presence means the run finished
EVAL_DIR = "eval"  # evaluation results inside a run folder
EMBEDDED_NAMES = ("embedded", "smollm2", "smollm2-135m")  # the bundled default model

Kind = Literal["run", "checkpoint", "adapter", "hf"]  # hf: a model folder or a hub id


class ArtifactError(UserError, FileNotFoundError):
    """The path is not something sparsedoc can load; the message says what was found."""


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """A run's complete checkpoints, oldest first (temp folders of interrupted saves, which
    have no ``trainer_state.json`` yet, are ignored)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := STEP_RE.match(p.name)) and (p / TRAINER_STATE).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """A run's newest complete checkpoint (None if it has none). ``checkpoints/latest`` (written
    after each save, for DeepSpeed's tools) must name a complete checkpoint when it exists: one
    that names a missing or unfinished folder means the run was copied or pruned by hand, and
    guessing which weights were meant would be wrong.

    Raises:
        ArtifactError: ``latest`` names no complete checkpoint.
    """
    ckpts = list_checkpoints(run_dir)
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if pointer.is_file():
        name = pointer.read_text(encoding="utf-8", errors="replace").strip()
        if not (STEP_RE.match(name) and is_checkpoint(pointer.parent / name)):
            have = ", ".join(p.name for p in ckpts) or "none"
            raise ArtifactError(f"{pointer} names {name[:40]!r}, which is not a complete "
                                f"checkpoint in {pointer.parent} (complete ones: {have}); a "
                                f"half-copied or pruned run? Name a checkpoint folder "
                                f"explicitly, or delete {pointer}")
    return ckpts[-1] if ckpts else None


def deepspeed_files_problem(ckpt: Path) -> str | None:
    """Why the DeepSpeed part of checkpoint ``ckpt`` is incomplete (None when it is not): a
    model-states file, and one optimizer shard per rank of the run that saved it."""
    if not any(ckpt.glob("*model_states.pt")):
        return "no DeepSpeed model states (*model_states.pt)"
    shards = {int(m.group(1)) for f in ckpt.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")
              if (m := re.match(r"zero_pp_rank_(\d+)_", f.name))}
    try:
        world = int(json.loads((ckpt / TRAINER_STATE).read_text(encoding="utf-8"))
                    .get("world_size", 1))
    except (OSError, ValueError, TypeError, AttributeError):
        return f"{TRAINER_STATE} does not parse"
    missing = sorted(set(range(world)) - shards) if shards else []
    if missing:
        return (f"optimizer shards missing for rank(s) {missing[:8]} of the {world} that saved "
                f"it (zero_pp_rank_N_mp_rank_00_optim_states.pt)")
    return None


def run_finished(run_dir: str | Path) -> bool:
    return (Path(run_dir) / RUN_SUMMARY).is_file()


def is_run(path: Path) -> bool:
    return (path / RUN_CONFIG).is_file() and (path / "checkpoints").is_dir()


def is_checkpoint(path: Path) -> bool:
    return (path / TRAINER_STATE).is_file()


@dataclass(frozen=True)
class AdapterMeta:
    """An adapter folder's ``adapter_config.json``, read once."""

    dir: Path
    method: Literal["lora", "prompt", "lora_moe"]
    base_model: str | None
    raw: dict

    @property
    def moe(self) -> dict | None:
        """The LoRA-MoE settings (``MoECfg`` fields) of a sparsedoc adapter, else None."""
        return self.raw.get("moe") if self.method == "lora_moe" else None


def read_adapter_meta(adapter_dir: str | Path) -> AdapterMeta:
    """Parse ``adapter_config.json``: a sparsedoc LoRA-MoE adapter or a peft one."""
    adapter_dir = Path(adapter_dir)
    path = adapter_dir / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ArtifactError(f"{path}: missing; not an adapter folder") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: expected a JSON object, got {type(raw).__name__}")
    if raw.get("format") == MOE_FORMAT:
        return AdapterMeta(adapter_dir, "lora_moe", raw.get("base_model"), raw)
    method = "prompt" if raw.get("peft_type") == "PROMPT_TUNING" else "lora"
    return AdapterMeta(adapter_dir, method, raw.get("base_model_name_or_path"), raw)


@dataclass(frozen=True)
class Artifact:
    """A located artifact. ``path`` is the resolved folder (or the hub id / ``embedded`` of a
    model that is not a local folder); ``run_dir`` and ``checkpoint`` are filled whenever the
    artifact sits inside a run, whichever of the three folders was named."""

    kind: Kind
    path: str
    run_dir: Path | None = None
    checkpoint: Path | None = None
    adapter_dir: Path | None = None

    @cached_property
    def trainer_state(self) -> dict | None:
        if self.checkpoint is None:
            return None
        return json.loads((self.checkpoint / TRAINER_STATE).read_text(encoding="utf-8"))

    @property
    def step(self) -> int | None:
        return (self.trainer_state or {}).get("step")

    @property
    def config_file(self) -> Path | None:
        """The checkpoint's copy of the run config first (it is what made those weights)."""
        for folder in (self.checkpoint, self.run_dir):
            if folder is not None and (folder / RUN_CONFIG).is_file():
                return folder / RUN_CONFIG
        return None

    def config(self):
        """The typed run config (``sparsedoc.config.Config``), or None outside a run."""
        from sparsedoc.config import load_config

        return load_config(self.config_file) if self.config_file else None

    @cached_property
    def adapter(self) -> AdapterMeta | None:
        if self.adapter_dir is None or not (self.adapter_dir / ADAPTER_CONFIG).is_file():
            return None
        return read_adapter_meta(self.adapter_dir)

    @property
    def name(self) -> str:
        """Short display name: ``<run>@<step>`` inside a run, else the folder's name."""
        if self.run_dir is not None and self.kind in ("run", "checkpoint"):
            return self.run_dir.name + (f"@{self.step}" if self.step is not None else "")
        return Path(self.path).name


@dataclass(frozen=True)
class Loaded:
    """What ``sparsedoc.loader.load_trained`` loaded: the identity evaluation results, caches,
    exports and generation logs carry. Fields that do not apply (a checkpoint's step for a plain
    model) are None."""

    kind: Kind
    method: str  # a name in sparsedoc.methods.METHODS, or "base" for a plain model
    path: str
    base_model: str
    fingerprint: str  # cheap identity of the weight files (path, size, mtime)
    name: str  # short display name: <run>@<step> inside a run, else the folder's name
    device: str
    dtype: str
    checkpoint: str | None = None
    step: int | None = None
    seed: int | None = None
    run_dir: str | None = None
    adapter_dir: str | None = None

    def record(self) -> dict:
        """Plain dict for JSON results and logger configs."""
        return asdict(self)


def looks_local(path: str) -> bool:
    """Whether a path that does not exist can only be meant as a local folder (absolute, ``./``,
    ``~``, more parts than ``org/name``, or under an existing folder), not a hub id or
    ``embedded``: such a path gets a clear "no such folder" instead of a failed hub lookup."""
    p = Path(path)
    if path.lower() in EMBEDDED_NAMES:
        return False
    return (p.is_absolute() or path.startswith((".", "~")) or len(p.parts) > 2
            or (len(p.parts) == 2 and p.parent.is_dir()))


def locate(path: str | Path) -> Artifact:
    """Recognise ``path``. A run resolves to its latest complete checkpoint; an adapter inside
    a checkpoint knows its checkpoint and run. A path that does not exist is taken as a hub id
    (or ``embedded``) and left to the model loader, unless it can only be meant as a local
    path (absolute, ``./``, ``~``, more parts than ``org/name``, or under an existing folder):
    that gets a clear error here instead of a failed hub lookup."""
    p = Path(path)
    if not p.exists():
        text = str(path)
        if looks_local(text):
            raise ArtifactError(f"{path}: no such folder (expected a training run, checkpoint, "
                                f"adapter or HF model folder, a hub id, or 'embedded')")
        return Artifact("hf", text)
    p = p.resolve()
    if not p.is_dir():
        raise ArtifactError(f"{p}: a file; expected a run, checkpoint, adapter or model folder")
    if is_run(p):
        last = latest_checkpoint(p)
        if last is None:
            raise ArtifactError(f"{p}: a run folder with no complete checkpoint in "
                                f"{p / 'checkpoints'}")
        return Artifact("run", str(p), run_dir=p, checkpoint=last, adapter_dir=last / "adapter")
    if is_checkpoint(p):
        return Artifact("checkpoint", str(p), run_dir=_run_of(p), checkpoint=p,
                        adapter_dir=p / "adapter")
    if (p / ADAPTER_CONFIG).is_file():
        ckpt = p.parent if is_checkpoint(p.parent) else None
        return Artifact("adapter", str(p), run_dir=_run_of(ckpt) if ckpt else None,
                        checkpoint=ckpt, adapter_dir=p)
    if (p / "config.json").is_file():
        return Artifact("hf", str(p))
    raise ArtifactError(f"{p}: not a run folder ({RUN_CONFIG} + checkpoints/), a checkpoint "
                        f"({TRAINER_STATE}), an adapter folder ({ADAPTER_CONFIG}) or a model "
                        f"folder (config.json)")


def _run_of(ckpt: Path) -> Path | None:
    run = ckpt.parent.parent
    return run if ckpt.parent.name == "checkpoints" and (run / RUN_CONFIG).is_file() else None
