"""What differs between training methods, in one small interface every command calls.

A method builds its adapter on the base model, turns a batch into a loss (plus metrics), may act
after each optimizer step (the MoE enqueues into its memory queue there), writes and loads its
adapter-only weights, says which export modes apply to it, and states the facts a model card
and a sweep need. Everything else (data, DeepSpeed, logging, checkpoints) is the loop's.
Methods are found by name in ``sparsedoc.methods.METHODS``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from sparsedoc.config import Config
from sparsedoc.errors import UserError
from sparsedoc.data.batch import model_inputs


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; ZeRO-3 partitioned params report their full size."""
    trainable = total = 0
    for p in model.parameters():
        n = getattr(p, "ds_numel", p.numel())
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


class MethodError(UserError, ValueError):
    """A request that does not apply to this method (an export mode, a swept parameter)."""


class Method:
    """Base class: full-model defaults that the adapter methods override."""

    name = "base"
    title = "base"  # in tables and model cards
    summary = ""  # one line for the model card: what was trained
    tag = ""  # the model card's hub tag
    config_section: str | None = None  # cfg.adapter.<section> holds the method's settings
    default_config = "moe_demo"  # the bundled recipe config ``sparsedoc train NAME`` starts from
    export_modes: tuple[str, ...] = ()  # what ``sparsedoc export --mode`` accepts; first: auto
    no_export_reason = "nothing trained to export"
    sweep_params: dict[str, str] = {}  # ``sparsedoc sweep --param`` short names -> config keys
    routes = False  # has routers: evaluation adds the routing analysis
    exclude_frozen_in_checkpoint = True  # the frozen base is reloaded from its source on resume
    calibration_batches = 0  # micro-batches per rank handed to ``calibrate`` (0: not called)
    # the loss components ``compute_loss`` reports: name -> key of its metrics (the loop names
    # the non-finite ones when it skips a micro-batch)
    loss_terms: dict[str, str] = {}
    plan_batches = 0  # micro-batches handed to ``plan`` before ``build`` (0: not called)

    def configure(self, cfg: Config) -> None:
        """Read the settings ``plan_batches`` depends on; called before ``plan`` and ``build``."""

    def plan(self, model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> None:
        """Decide, from the frozen base ``model`` and a few training batches, what ``build``
        will build (Sensitivity-LoRA's rank map). Called on every rank of a fresh run with the
        same batches (the same seeded sample everywhere, so every rank decides the same)."""

    def restore_plan(self, ckpt_dir: Path) -> None:
        """On resume, instead of ``plan``: what ``plan`` decided, read back from ``ckpt_dir``."""

    def build(self, model: nn.Module, cfg: Config) -> nn.Module:
        raise NotImplementedError

    def check_data(self, cfg: Config, train_labels: dict[str, int]) -> None:
        """Refuse training data this method cannot learn from (raise a ``UserError``) before
        anything is written. ``train_labels``: training records per routing label
        (``schema.routing_label``; records without one are counted under "")."""

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """The optimizer's parameter groups: every trainable parameter at ``lr``."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": lr}]

    def compute_loss(self, model, batch: dict[str, torch.Tensor], step: int
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        """``model`` runs the forward: the DeepSpeed engine in training, a bare model in tests."""
        out = model(**model_inputs(batch))
        return out.loss, {}

    def calibrate(self, model, batches: list[dict[str, torch.Tensor]]) -> None:
        """Called once on every rank before the first step of a fresh (not resumed) run, with
        a few training batches already on the device; data-dependent initialisation goes here."""

    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        """Called on every rank after each optimizer step, under no_grad."""

    def drop_micro_batch(self, model: nn.Module) -> None:
        """The last ``compute_loss`` was non-finite on some rank and is skipped on all: forget
        what it left behind (queued keys, telemetry)."""

    def checked_layers(self, model: nn.Module) -> list[str]:
        """The layers ``first_nonfinite_layer`` may name, in forward order."""
        return [n for n, m in model.named_modules()
                if any(p.requires_grad for p in m.parameters(recurse=False))]

    def first_nonfinite_layer(self, model: nn.Module) -> str | None:
        """After a non-finite loss: the first layer (forward order) whose trainable weights are
        non-finite (None if none is). Methods that see activations look there too."""
        for name, m in model.named_modules():
            for p in m.parameters(recurse=False):
                if p.requires_grad and p.numel() and not bool(torch.isfinite(p.detach()).all()):
                    return name
        return None

    def checkpoint_state(self) -> dict | None:
        """This rank's JSON-able state kept in a checkpoint (None: nothing to keep)."""
        return None

    def restore_state(self, state: dict) -> None:
        """Restore ``checkpoint_state`` (``state["from_rank"]`` set: another rank's)."""

    def step_metrics(self, model: nn.Module, step: int) -> dict[str, float]:
        """Extra metrics for the logging step (rank 0 logs them)."""
        return {}

    def write_adapter(self, model: nn.Module, out_dir: Path) -> None:
        """Write adapter-only weights on rank 0; parameters are already gathered (ZeRO-3)."""

    def on_checkpoint(self, model: nn.Module, ckpt_dir: Path, step: int) -> dict[str, str]:
        """Rank-0 extras saved into a checkpoint (plots, telemetry); returns images to log as
        ``{metric key: file name inside the checkpoint}``."""
        return {}

    def write_run_files(self, run_dir: Path) -> dict[str, str]:
        """Rank-0 files the method adds to the run folder when it opens (the rank map);
        returns images to log as ``{metric key: file name inside run_dir}``."""
        return {}

    def run_facts(self) -> dict:
        """Extra entries for the run's ``summary.json``."""
        return {}

    @classmethod
    def card_lines(cls, lineage: dict) -> list[str]:
        """Markdown the model card adds for this method (a section of its own), from the
        export's lineage (``sparsedoc.export.lineage.collect_lineage``)."""
        return []

    # ---- after training -------------------------------------------------------------------------
    @classmethod
    def load_adapter(cls, model: nn.Module, adapter_dir: Path) -> nn.Module:
        """The base ``model`` with the adapter written by ``write_adapter`` applied."""
        raise MethodError(f"{adapter_dir}: method {cls.name} writes no adapter folder")

    @classmethod
    def export_mode(cls, mode: str, moe_cfg=None) -> str:
        """The export mode for ``--mode mode`` (``auto``: this method's default)."""
        if not cls.export_modes:
            raise MethodError(cls.no_export_reason)
        if mode == "auto":
            return cls.export_modes[0]
        if mode not in cls.export_modes:
            raise MethodError(f"--mode {mode} does not apply to a {cls.name} model; choose from "
                              f"{', '.join(cls.export_modes)}")
        return mode

    @classmethod
    def merged(cls, model: nn.Module) -> nn.Module:
        """The trained model as one plain model of the base architecture (export mode merged)."""
        raise MethodError(f"mode merged needs a LoRA or full fine-tune run; this is {cls.name}")
