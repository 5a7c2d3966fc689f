"""Metric logging behind one small interface: a JSONL file tests read back, and W&B.

Only rank 0 logs. W&B runs offline unless asked otherwise (``logging.mode`` or ``WANDB_MODE``):
nothing leaves the machine by default, which is the right default for medical data. Record text is
never logged here; only numbers and images.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol

from sparsedoc import fsio
from sparsedoc.config import LoggingCfg


class MetricLogger(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def log_image(self, key: str, path: str | Path, step: int) -> None: ...

    def close(self) -> None: ...


def _clean(value: Any) -> Any:
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class JsonlLogger:
    """Append-only ``metrics.jsonl``: one ``{"step": n, ...}`` object a line."""

    def __init__(self, path: str | Path, truncate_after_step: int | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if truncate_after_step is not None and self.path.exists():
            # A resumed run re-logs the steps after its checkpoint; drop the stale copies.
            keep = [line for line in self.path.read_text(encoding="utf-8").splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= truncate_after_step]
            fsio.write_lines(self.path, keep)  # a crash here keeps the old log whole
        self._f = self.path.open("a", encoding="utf-8")

    def log(self, metrics: dict[str, float], step: int) -> None:
        row = {"step": step, **{k: _clean(v) for k, v in metrics.items()}}
        self._f.write(json.dumps(row) + "\n")
        self._f.flush()

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        self.log({f"{key}_path": str(path)}, step)

    def close(self) -> None:
        self._f.close()


class WandbLogger:
    """W&B run in ``run_dir/wandb``; offline mode writes a real run folder with no network."""

    def __init__(self, cfg: LoggingCfg, run_dir: str | Path, config: dict, resume_id: str = ""):
        import wandb

        mode = cfg.mode if cfg.mode != "auto" else os.environ.get("WANDB_MODE", "offline")
        self._wandb = wandb
        self.run = wandb.init(project=cfg.project, name=cfg.run_name or Path(run_dir).name,
                              tags=cfg.tags or None, config=config, dir=str(run_dir), mode=mode,
                              id=resume_id or None, resume="allow" if resume_id else None)

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log({k: _clean(v) for k, v in metrics.items()}, step=step)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        self.run.log({key: self._wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        self.run.finish()


class MultiLogger:
    def __init__(self, loggers: list[MetricLogger]):
        self.loggers = loggers

    def log(self, metrics: dict[str, float], step: int) -> None:
        for lg in self.loggers:
            lg.log(metrics, step)

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        for lg in self.loggers:
            lg.log_image(key, path, step)

    def close(self) -> None:
        for lg in self.loggers:
            lg.close()


class NullLogger:
    """What non-zero ranks get: every call is a no-op."""

    def log(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_image(self, key: str, path: str | Path, step: int) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(path: str | Path) -> list[dict]:
    """Rows of a ``metrics.jsonl`` (for tests, reports and plots)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()
            if line.strip()]
