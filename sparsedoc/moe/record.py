"""Routing as data: what the LoRA-MoE layers decided in one forward, handed back to the caller.

    with record_routing(sample_rows=rows) as record:
        out = model(**inputs)
    record.routing["model.layers.0.mlp"]        # RouterOutput: logits, probs, top-k, gates
    record.expert_outputs["model.layers.0.mlp"]  # every expert's output on the sampled rows

Layers find the active recorder through a context variable and add to it; after the forward no
module holds any routing tensor. Losses, calibration, telemetry, exports and the routing analysis
read the record they were given.

Activation checkpointing. The recorder is active only inside the ``with``; the recompute of a
checkpointed block runs later, during backward. ``checkpoint_context`` (passed to
``torch.utils.checkpoint`` as ``context_fn``) re-activates the recorder's *request* for the
recompute, so the recomputed forward runs exactly the ops of the first one (the sampled expert
outputs included, which non-reentrant checkpointing requires), while nothing is written to the
record a second time.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from sparsedoc.moe.router import RouterOutput


@dataclass
class ExpertSample:
    """Every expert's output on a few sampled tokens of one layer: the expert contrast's input.

    ``outputs[i, e]`` is expert e's contribution to the layer output for token ``rows[i]``
    (``s B_e A_e x`` for a linear, ``FFN_e(x) - FFN(x)`` for an FFN expert), computed for all E
    experts, chosen or not, with gradient (and dropout when the model is training)."""

    rows: torch.Tensor  # (n,) flattened token indices
    outputs: torch.Tensor  # (n, E, out)
    top_idx: torch.Tensor  # (n, k) experts the router chose for those tokens
    top_gates: torch.Tensor  # (n, k) their gates (carry the router's gradient)


class RoutingRecorder:
    """Collects the routing of one forward.

    Args:
        sample_rows: flattened token indices whose every-expert outputs the layers compute and
            record (the expert contrast); None records none.
        input_rows: bool (T,) tokens whose router inputs are summed per routing layer (router
            calibration); None sums none.
    """

    def __init__(self, sample_rows: torch.Tensor | None = None,
                 input_rows: torch.Tensor | None = None):
        self.sample_rows = sample_rows
        self.input_rows = input_rows
        self.writes = True  # False in a checkpoint recompute: same ops, nothing recorded
        self.routing: dict[str, RouterOutput] = {}
        self.expert_outputs: dict[str, ExpertSample] = {}
        self.input_sums: dict[str, tuple[torch.Tensor, int]] = {}  # (sum float64 cpu, count)

    def add_routing(self, name: str, routing: RouterOutput) -> None:
        if not self.writes:
            return
        if name in self.routing:
            raise RuntimeError(f"{name} routed twice in one recorded forward; record one forward "
                               "per recorder")
        self.routing[name] = routing

    def add_expert_outputs(self, name: str, sample: ExpertSample) -> None:
        if self.writes:
            self.expert_outputs[name] = sample

    def add_router_input(self, name: str, h: torch.Tensor) -> None:
        """Sum the real-token rows of a router's input ``h`` (T, in) for calibration."""
        if not self.writes:
            return
        rows = h[self.input_rows.to(h.device)].detach().double()
        self.input_sums[name] = (rows.sum(0).cpu(), rows.shape[0])

    def replay(self) -> RoutingRecorder:
        """The same request with writes off, for an activation-checkpoint recompute."""
        twin = RoutingRecorder(self.sample_rows, self.input_rows)
        twin.writes = False
        return twin


_ACTIVE: ContextVar[RoutingRecorder | None] = ContextVar("sparsedoc_routing_recorder",
                                                         default=None)


def active_recorder() -> RoutingRecorder | None:
    return _ACTIVE.get()


@contextlib.contextmanager
def record_routing(sample_rows: torch.Tensor | None = None,
                   input_rows: torch.Tensor | None = None):
    """Record the routing of the forward run inside the ``with`` (see module docstring)."""
    with _activate(RoutingRecorder(sample_rows, input_rows)) as recorder:
        yield recorder


@contextlib.contextmanager
def _activate(recorder: RoutingRecorder | None):
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def checkpoint_context() -> tuple[contextlib.AbstractContextManager,
                                  contextlib.AbstractContextManager]:
    """``context_fn`` for ``torch.utils.checkpoint``: the first forward runs as is; the
    recompute sees a write-less twin of the recorder that was active then (or none)."""
    recorder = _ACTIVE.get()
    return contextlib.nullcontext(), _activate(recorder.replay() if recorder else None)
