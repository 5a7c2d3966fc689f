"""Faults a long run meets on a shared cluster, and the switch that inflicts them in tests.

- ``StopSignals``: a preemption notice (SIGTERM, or SIGINT from Ctrl-C) is remembered and acted
  on at the next optimizer-step boundary, where all ranks agree through one all-reduce (so a
  signal that reached only some ranks stops every rank at the same step). A second notice
  aborts at once.
- ``agree_on_micro_batch``: whether any rank's loss (any component) went non-finite, decided
  together before backward, so every rank skips the same micro-batch and no collective inside
  backward is left waiting.
- ``FaultInjector``: ``SPARSEDOC_INJECT_FAULT`` (tests only) makes a chosen rank SIGKILL itself
  mid-step or mid-save, puts NaN into one module's output at chosen steps, or slows every step.

Exit codes (docs/robustness.md): ``PREEMPTED_EXIT`` after a preemption checkpoint,
``NONFINITE_EXIT`` after too many non-finite steps in a row; 2 stays "bad input".
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from dataclasses import dataclass, field

import torch

from sparsedoc.distributed import all_gather_cat

log = logging.getLogger("sparsedoc")

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: "try again later"; a checkpoint at the current step exists
NONFINITE_EXIT = 3  # stopped after train.max_consecutive_skips non-finite steps in a row
FAULT_ENV = "SPARSEDOC_INJECT_FAULT"


class RunStopped(SystemExit):
    """Training stopped early, cleanly, with a checkpoint: ``code`` is the process exit status.
    A subclass of ``SystemExit`` so a recipe exits with the code; Python callers can catch it."""

    def __init__(self, code: int, message: str, checkpoint=None, step: int = 0):
        super().__init__(code)
        self.message, self.checkpoint, self.step = message, checkpoint, step


class StopSignals:
    """The first SIGTERM / SIGINT asks the run to stop after the current optimizer step;
    another one, more than ``same_notice_s`` later, exits at once with 128 + signal.

    Several signals within ``same_notice_s`` count as one notice: Ctrl-C reaches the launcher
    and every rank together, and the ``deepspeed`` launcher then forwards its own SIGTERM.
    """

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT), same_notice_s: float = 2.0):
        self.signals, self.same_notice_s = signals, same_notice_s
        self.signum: int | None = None
        self.at = 0.0
        self._old: dict[int, object] = {}

    def install(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
            for s in self.signals:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def _handle(self, signum: int, frame) -> None:
        now = time.monotonic()
        name = signal.Signals(signum).name
        if self.signum is None:
            self.signum, self.at = signum, now
            # os.write, not logging: a handler may run while the logging lock is held
            os.write(2, f"sparsedoc: {name} received; stopping after the current step with a "
                        f"checkpoint (send it again to abort at once)\n".encode())
        elif now - self.at > self.same_notice_s:
            os.write(2, f"sparsedoc: second {name}: aborting now, no checkpoint\n".encode())
            os._exit(128 + signum)

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def agreed(self) -> dict[int, str]:
        """Collective: ``{rank: signal name}`` of the ranks that received a stop signal (empty:
        none did; then every rank goes on)."""
        got = all_gather_cat(torch.tensor([float(self.signum or 0)], dtype=torch.float64))
        return {r: signal.Signals(int(s)).name for r, s in enumerate(got.tolist()) if s}


# ---- non-finite steps -------------------------------------------------------------------------
def nonfinite_terms(loss: torch.Tensor, extras: dict, terms: dict[str, str]) -> list[str]:
    """Names of the loss components (``terms``: name -> metrics key of ``compute_loss``'s
    extras) that are not finite; ``total`` when only the summed loss is."""
    named = [(name, extras[key]) for name, key in terms.items() if key in extras]
    flags = [torch.isfinite(torch.as_tensor(v, device=loss.device)).all() for _, v in named]
    finite = torch.stack(flags + [torch.isfinite(loss.detach()).all()]).tolist()  # one sync
    bad = [name for (name, _), ok in zip(named, finite) if not ok]
    if not bad and not finite[-1]:
        bad = ["total"]
    return bad


@dataclass
class BadMicroBatch:
    """A micro-batch skipped on every rank: which ranks saw what."""

    ranks: list[int]
    terms: list[str]
    layer: str | None  # first non-finite router/expert layer, from the lowest bad rank


def agree_on_micro_batch(bad_terms: list[str], layer: str | None, all_terms: list[str],
                         layer_names: list[str]) -> BadMicroBatch | None:
    """Collective: every rank passes what it found; all get the same verdict (None: all finite)."""
    names = [*all_terms, "total", "grad_norm"]
    row = [float(bool(bad_terms))] + [float(n in bad_terms) for n in names]
    row.append(float(layer_names.index(layer)) if layer in layer_names else -1.0)
    table = all_gather_cat(torch.tensor([row], dtype=torch.float64))  # (world, 2 + len(names))
    ranks = [r for r in range(table.shape[0]) if table[r, 0] > 0]
    if not ranks:
        return None
    terms = [n for i, n in enumerate(names) if table[:, 1 + i].any()]
    found = [int(table[r, -1]) for r in ranks if table[r, -1] >= 0]
    return BadMicroBatch(ranks, terms, layer_names[found[0]] if found else None)


@dataclass
class SkipCounter:
    """Skipped micro-batches / steps: in total and in a row (saved in ``trainer_state.json``)."""

    total: int = 0
    in_a_row: int = 0

    def skipped(self) -> None:
        self.total += 1
        self.in_a_row += 1

    def good_step(self) -> None:
        self.in_a_row = 0


# ---- fault injection (tests) ------------------------------------------------------------------
@dataclass
class Fault:
    kind: str  # nan | kill | slow
    # step attempts (1-based: the optimizer step being computed, skipped ones counted, so a
    # fault at attempt 2 hits once even though the step it skips is computed again); None: all
    steps: set[int] | None
    rank: int | None = None  # None: every rank
    options: dict[str, str] = field(default_factory=dict)

    def hits(self, step: int, rank: int) -> bool:
        return ((self.steps is None or step in self.steps)
                and (self.rank is None or self.rank == rank))


def parse_faults(spec: str) -> list[Fault]:
    """``kind@steps[:key=value...]`` items joined by ``;``. ``steps``: ``3``, ``3,5``, ``4-9``
    or ``*`` (step attempts; ``kill:at=save``: the step being saved). Keys: ``rank``; nan: ``module`` (a module name; none: the loss itself); kill:
    ``at`` (``step``: after the forward, before backward | ``save``: DeepSpeed's files written,
    checkpoint not yet complete); slow: ``s`` seconds per step.

    Example: ``nan@3:rank=1:module=model.layers.1;kill@5:at=save:rank=0``."""
    faults = []
    for item in filter(None, (s.strip() for s in spec.split(";"))):
        head, *opts = item.split(":")
        kind, _, steps = head.partition("@")
        if kind not in ("nan", "kill", "slow"):
            raise ValueError(f"{FAULT_ENV}: unknown fault {kind!r} in {item!r}")
        chosen: set[int] | None = None
        if steps not in ("", "*"):
            chosen = set()
            for part in steps.split(","):
                lo, _, hi = part.partition("-")
                chosen.update(range(int(lo), int(hi or lo) + 1))
        options = dict(o.split("=", 1) for o in opts)
        rank = options.pop("rank", None)
        faults.append(Fault(kind, chosen, None if rank is None else int(rank), options))
    return faults


class FaultInjector:
    """Inflicts the faults of ``SPARSEDOC_INJECT_FAULT`` on this rank (a no-op when unset)."""

    def __init__(self, rank: int, spec: str | None = None):
        spec = os.environ.get(FAULT_ENV, "") if spec is None else spec
        self.rank, self.faults = rank, parse_faults(spec)
        if self.faults:
            log.warning("%s=%s: faults will be injected (tests only)", FAULT_ENV, spec)

    def _hits(self, kind: str, step: int) -> list[Fault]:
        return [f for f in self.faults if f.kind == kind and f.hits(step, self.rank)]

    def kill(self, step: int, at: str) -> None:
        """SIGKILL this process if a kill fault is set for ``step`` at point ``at``."""
        if any(f.options.get("at", "step") == at for f in self._hits("kill", step)):
            log.warning("injected fault: SIGKILL at %s of step %d", at, step)
            logging.shutdown()
            os.kill(os.getpid(), signal.SIGKILL)

    def slow(self, step: int) -> None:
        for f in self._hits("slow", step):
            time.sleep(float(f.options.get("s", "0.5")))

    def nan(self, step: int) -> list[str]:
        """Module names (``""``: the loss) whose output is NaN in this step's micro-batches."""
        return [f.options.get("module", "") for f in self._hits("nan", step)]


def nan_output_hook(module, args, output):
    """Forward hook (fault injection only): the module's output, times NaN."""
    if isinstance(output, torch.Tensor):
        return output * float("nan")
    if isinstance(output, tuple) and output and isinstance(output[0], torch.Tensor):
        return (output[0] * float("nan"), *output[1:])
    raise TypeError(f"cannot inject NaN into a {type(output).__name__} output")
