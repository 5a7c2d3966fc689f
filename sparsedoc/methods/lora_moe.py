"""LoRA-MoE training method: total loss = LM + balance + z + contrastive, plus telemetry.

Each forward runs inside ``record_routing``; the losses, the calibration and the telemetry read
the record it returns (``sparsedoc.moe.record``). The label contrast's new queue entries (one
per record) wait here, detached, and are gathered from all ranks and enqueued once, after the
optimizer step.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

from sparsedoc.config import Config, ConfigError, MoECfg, replace
from sparsedoc.data.batch import model_inputs, real_tokens
from sparsedoc.methods.base import Method, MethodError
from sparsedoc.methods.sensitivity import (RANK_MAP_FILE, RANK_PLOT_FILE, RankMap,
                                           estimate_rank_map, plot_rank_map)
from sparsedoc.models.load import is_encoder_decoder, resolve_model_path
from sparsedoc.moe import losses
from sparsedoc.moe.inject import (block_index, inject_lora_moe, load_moe_adapter, moe_layers,
                                  routing_layers, save_moe_adapter)
from sparsedoc.moe.memory_queue import MemoryQueue
from sparsedoc.moe.record import RoutingRecorder, record_routing
from sparsedoc.moe.router import TopKRouter
from sparsedoc.moe.telemetry import RoutingStats
from sparsedoc.distributed import (all_gather_cat, all_gather_rows, all_reduce_sum,
                                         all_reduce_tensor)

log = logging.getLogger("sparsedoc")

LABEL_QUEUE_NAME = "moe_label_queue"
# the objectives that keep past records' routing prototypes in the label queue
LABEL_OBJECTIVES = ("label", "label_mi")


def label_queue(model: nn.Module) -> MemoryQueue | None:
    return getattr(model, LABEL_QUEUE_NAME, None)


def queue_bytes(model: nn.Module) -> int:
    return sum(m.nbytes for m in model.modules() if isinstance(m, MemoryQueue))


def queues_in_sync(model: nn.Module) -> bool:
    """Whether every data-parallel rank holds the same memory queues and calibrated router
    directions (collective call)."""
    digest = torch.zeros(1, dtype=torch.float64)
    for i, q in enumerate(m for m in model.modules() if isinstance(m, MemoryQueue)):
        w = torch.arange(1, q.vectors[0].numel() + 1, dtype=torch.float64)
        for g in range(q.groups):  # position-weighted, so order matters, not just content
            digest += (q.vectors[g].double().cpu().flatten() * w).sum() * (i + g + 1)
        digest += q.ptr.double().cpu().sum() * 7 + q.count.double().cpu().sum() * 13
        digest += q.labels.double().cpu().sum()
    for i, r in enumerate(m for m in model.modules() if isinstance(m, TopKRouter)):
        digest += r.shared_direction.double().cpu().sum() * (i + 3)  # calibration agrees too
    everyone = all_gather_cat(digest)
    return bool((everyone == everyone[0]).all())


class StackedRouting(NamedTuple):
    """Every router's decision on one micro-batch, stacked (L routers, T tokens): the losses and
    the telemetry run once over the stack, not once per router."""

    logits: torch.Tensor  # (L, T, E)
    probs: torch.Tensor  # (L, T, E)
    top_idx: torch.Tensor  # (L, T, k)


def stacked_routing(record: RoutingRecorder, names: list[str]) -> StackedRouting:
    routings = [record.routing[n] for n in names]
    return StackedRouting(*(torch.stack([getattr(r, f) for r in routings])
                            for f in StackedRouting._fields))


def resolve_dispatch(name: str) -> str:
    # "auto" is the measured winner (sparsedoc bench, docs/method.md): dense.
    return "dense" if name == "auto" else name


class EncoderDecoderUnsupported(MethodError):
    """LoRA-MoE asked to train an encoder-decoder model (not supported: docs/method.md)."""


class LoraMoEMethod(Method):
    name = "lora_moe"
    title = "LoRA-MoE"
    summary = ("LoRA-MoE: a mixture of LoRA experts behind learned top-k routers on the frozen "
               "base (sparsedoc)")
    tag = "lora-moe"
    config_section = "moe"
    default_config = "moe_demo"
    export_modes = ("routed", "mixtral", "dense")
    sweep_params = {"rank": "adapter.moe.r", "experts": "adapter.moe.num_experts",
                    "top_k": "adapter.moe.top_k"}
    routes = True
    loss_terms = {"lm": "train/lm_loss", "balance": "moe/balance_loss", "z": "moe/z_loss",
                  "contrast": "moe/contrastive_loss"}

    def __init__(self) -> None:
        self.cfg: MoECfg | None = None
        self.rank_map = None  # sensitivity.RankMap with rank_allocation=sensitivity
        self.seed = 0
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (reprs, labels) per micro
        self.micro_in_step = 0
        self.stats: RoutingStats | None = None
        self.base_model = ""
        self.label_queue: MemoryQueue | None = None
        self.router_finite: torch.Tensor | None = None  # (routers,) of the last forward
        self.pending_before = 0

    # ---- the expert ranks (adapter.moe.rank_allocation=sensitivity) ---------------------------
    def configure(self, cfg: Config) -> None:
        self.run_cfg = cfg
        if cfg.adapter.moe.rank_allocation == "sensitivity":
            self.plan_batches = cfg.adapter.sensitivity.calibration_batches

    def plan(self, model: nn.Module, batches: list[dict]) -> None:
        """Sensitivity-LoRA's rank map on the frozen base, as each wrapped linear's expert
        rank (the budget: one expert's parameters at the uniform rank r)."""
        moe, s = self.run_cfg.adapter.moe, self.run_cfg.adapter.sensitivity
        self.rank_map = estimate_rank_map(
            model, moe.target_modules, batches, uniform_rank=moe.r, budget=s.budget,
            min_rank=s.min_rank, max_rank=s.max_rank, local_weight=s.local_weight,
            labels=s.labels, seed=self.run_cfg.train.seed)

    def restore_plan(self, ckpt_dir: Path) -> None:
        self.rank_map = RankMap.load(Path(ckpt_dir) / RANK_MAP_FILE)

    def write_run_files(self, run_dir: Path) -> dict[str, str]:
        if self.rank_map is None:
            return {}
        self.rank_map.save(run_dir / RANK_MAP_FILE)
        plot_rank_map(self.rank_map, run_dir / RANK_PLOT_FILE,
                      f"LoRA-MoE expert ranks from sensitivity (uniform r="
                      f"{self.rank_map.uniform_rank}, {self.rank_map.params:,} of "
                      f"{self.rank_map.budget:,} params per expert)")
        return {"sensitivity/rank_map": RANK_PLOT_FILE}

    def run_facts(self) -> dict:
        return {"rank_map": self.rank_map.summary()} if self.rank_map is not None else {}

    # ---- build ------------------------------------------------------------------------------
    def build(self, model: nn.Module, cfg: Config) -> nn.Module:
        if is_encoder_decoder(model):
            raise EncoderDecoderUnsupported(
                f"adapter.method=lora_moe: model.name_or_path={cfg.model.name_or_path} is an "
                f"encoder-decoder ({model.config.model_type}); LoRA-MoE is built for decoder-only "
                f"models: its router calibration, label contrast and routed export read one "
                f"token stream (record_ids over decoder tokens), and the encoder's and decoder's "
                f"two streams are not supported yet. Use adapter.method=lora, prompt or full")
        self.cfg, self.seed = cfg.adapter.moe, cfg.train.seed
        if self.rank_map is not None:  # the adapter's own config carries the ranks it has
            self.cfg = replace(self.cfg, rank_pattern=dict(self.rank_map.ranks))
        self.dispatch = resolve_dispatch(self.cfg.dispatch)
        self.calibration_batches = self.cfg.router_calibration_batches
        self.base_model = resolve_model_path(cfg.model)
        inject_lora_moe(model, self.cfg, self.dispatch)
        # Found once: DeepSpeed wraps the model object, it does not replace its modules.
        routers = routing_layers(model)
        self.router_names = [n for n, _ in routers]
        self.routers = [layer.router for _, layer in routers]
        self.layer_names = [n for n, _ in moe_layers(model)]
        if self.cfg.contrastive in LABEL_OBJECTIVES:
            dim = len(routers) * self.cfg.num_experts
            # Registered on the model so DeepSpeed checkpoints carry it with the weights.
            self.label_queue = MemoryQueue(1, self.cfg.queue_size, dim)
            model.add_module(LABEL_QUEUE_NAME, self.label_queue)
        self.stats = RoutingStats(self.router_names, self.cfg.num_experts,
                                  [block_index(n) for n in self.router_names],
                                  self.cfg.collapse_threshold, self.cfg.collapse_patience)
        log.info("LoRA-MoE: %d layers wrapped, %d routers, E=%d top-%d r=%s, dispatch=%s, "
                 "contrastive=%s, memory queue %.2f MiB", len(self.layer_names), len(routers),
                 self.cfg.num_experts, self.cfg.top_k,
                 self.cfg.r if self.rank_map is None else
                 f"{min(self.rank_map.ranks.values())}..{max(self.rank_map.ranks.values())}"
                 " (sensitivity)", self.dispatch,
                 self.cfg.contrastive, queue_bytes(model) / 2**20)
        return model

    def check_data(self, cfg: Config, train_labels: dict[str, int]) -> None:
        moe = cfg.adapter.moe
        labelled = {k: n for k, n in train_labels.items() if k}
        if moe.contrastive in LABEL_OBJECTIVES and len(labelled) < 2:
            found = (f"only {next(iter(labelled))!r}" if labelled else "none")
            raise ConfigError(
                f"adapter.moe.contrastive={moe.contrastive} contrasts records by label, but the "
                f"records of data.train_files carry {len(labelled)} distinct label(s) "
                f"(meta.label, else meta.subject, else meta.source): {found}; expected >= 2. "
                f"Label the records, or set adapter.moe.contrastive=none (or expert)")

    def param_groups(self, model: nn.Module, lr: float) -> list[dict]:
        """Routers at ``router_lr_scale x lr``, everything else trainable at ``lr``."""
        router_ids = {id(p) for r in self.routers for p in r.parameters()}
        trainable = [p for p in model.parameters() if p.requires_grad]
        rest = [p for p in trainable if id(p) not in router_ids]
        routers = [p for p in trainable if id(p) in router_ids]
        if self.cfg.router_lr_scale == 1.0 or not routers:
            return [{"params": trainable, "lr": lr}]
        return [{"params": rest, "lr": lr},
                {"params": routers, "lr": lr * self.cfg.router_lr_scale}]

    # ---- before the first step -----------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, model, batches: list[dict[str, torch.Tensor]]) -> None:
        """Measure each router's mean input direction on ``batches`` (real tokens only, summed
        over ranks) and project it out of the routing (router.py says why). ``model`` is
        whatever runs the forward: the DeepSpeed engine in training, the bare model in tests."""
        if not batches:
            return
        sums = {n: torch.zeros(r.in_features, dtype=torch.float64)
                for n, r in zip(self.router_names, self.routers)}
        counts = dict.fromkeys(self.router_names, 0)
        was_training = model.training
        model.eval()
        for batch in batches:
            with record_routing(input_rows=real_tokens(batch).reshape(-1)) as record:
                model(**model_inputs(batch))
            for n, (total, count) in record.input_sums.items():
                sums[n] += total
                counts[n] += count
        model.train(was_training)
        for n, router in zip(self.router_names, self.routers):
            both = all_reduce_tensor(torch.cat([sums[n], sums[n].new_tensor([counts[n]])]))
            if both[-1] > 0:
                router.set_shared_direction(both[:-1] / both[-1])
        log.info("LoRA-MoE: %d routers calibrated on %d batches per rank (shared input direction "
                 "projected out)", len(self.routers), len(batches))

    # ---- one micro-batch --------------------------------------------------------------------
    def _sample_tokens(self, batch: dict[str, torch.Tensor], step: int) -> torch.Tensor:
        """Token rows for the expert contrast; seeded by (seed, step, micro) so a resumed run
        samples what the uninterrupted run sampled."""
        valid = real_tokens(batch).reshape(-1).nonzero().squeeze(-1).cpu()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1_009 + self.micro_in_step)
        n = min(self.cfg.contrastive_tokens, len(valid))
        return valid[torch.randperm(len(valid), generator=g)[:n]].sort().values

    def compute_loss(self, model, batch: dict[str, torch.Tensor], step: int
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        """LM loss plus the router losses, from one recorded forward. ``model`` runs the forward
        (the DeepSpeed engine in training, the bare model in tests); backward runs later,
        outside the recording, so an activation-checkpoint recompute records nothing."""
        cfg = self.cfg
        sample = self._sample_tokens(batch, step) if cfg.contrastive == "expert" else None
        with record_routing(sample_rows=sample) as record:
            out = model(**model_inputs(batch))
        self.stats.mark()
        self.pending_before = len(self.pending)
        routing = stacked_routing(record, self.router_names)
        # one flag per router, no host sync: read only when the loss is non-finite
        self.router_finite = torch.isfinite(routing.logits).flatten(1).all(1)
        aux = self.router_losses(record, batch, routing)
        self.stats.add(slice(None), routing.top_idx, routing.probs, real_tokens(batch))
        total = (out.loss + cfg.balance_weight * aux["balance"] + cfg.z_weight * aux["z"]
                 + cfg.contrastive_weight * aux["contrastive"])
        self.micro_in_step += 1
        # detached tensors: the loop sums them on the device and reads them when it logs
        metrics = {"train/lm_loss": out.loss.detach(),
                   "moe/balance_loss": aux["balance"].detach(),
                   "moe/z_loss": aux["z"].detach(),
                   "moe/contrastive_loss": aux["contrastive"].detach(),
                   "moe/contrastive_anchors": aux["anchors"]}
        if "expert_similarity" in aux:
            metrics["moe/expert_output_cosine"] = aux["expert_similarity"]
        return total, metrics

    def router_losses(self, record: RoutingRecorder, batch: dict[str, torch.Tensor],
                      routing: StackedRouting | None = None) -> dict:
        """Balance, z and contrastive losses of one recorded forward (means over layers)."""
        cfg = self.cfg
        real = real_tokens(batch)
        routing = routing or stacked_routing(record, self.router_names)
        routings = [record.routing[n] for n in self.router_names]
        balance = losses.load_balance_loss(routing.probs, routing.top_idx, real).mean()
        z = losses.router_z_loss(routing.logits, real).mean()
        out = {"balance": balance, "z": z, "contrastive": balance.new_zeros(()), "anchors": 0}
        if cfg.contrastive == "label":
            tokens = losses.token_routing_repr(routing.logits)
            labels = batch["record_label_ids"].to(tokens.device)
            q_vecs, q_labels = self.label_queue.get(0)
            out["contrastive"], protos, out["anchors"] = losses.label_contrastive_loss(
                tokens, batch["record_ids"], labels, q_vecs, q_labels, cfg.temperature)
            self.pending.append((protos.float(), labels))
        elif cfg.contrastive == "label_mi":
            labels = batch["record_label_ids"]
            q_vecs, q_labels = self.label_queue.get(0)
            # sharpened by the temperature: at near-uniform routing the information has no
            # gradient (a saddle), and as temperature -> 0 it becomes the top-1's information
            sharp = [(r.logits.float() / cfg.temperature).softmax(-1) for r in routings]
            out["contrastive"], protos, out["anchors"] = losses.label_routing_mi_loss(
                sharp, batch["record_ids"], labels, q_vecs, q_labels)
            self.pending.append((protos.float(), labels.to(protos.device)))
        elif cfg.contrastive == "expert":
            terms, sims, n_total = [], [], 0
            for name in self.layer_names:
                s = record.expert_outputs[name]
                loss, n = losses.expert_contrastive_loss(s.outputs, s.top_idx, s.top_gates,
                                                         cfg.temperature)
                if n:
                    terms.append(loss)
                    sims.append(float(losses.expert_output_similarity(s.outputs.detach())))
                    n_total += n
            if terms:
                out["contrastive"] = torch.stack(terms).mean()
                out["expert_similarity"] = sum(sims) / len(sims)
            out["anchors"] = n_total
        return out

    # ---- after the optimizer step -----------------------------------------------------------
    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        self.micro_in_step = 0
        if not self.pending:
            return
        # (records, L*E) from every rank, in rank order: identical queues on all ranks
        vecs = all_gather_rows(torch.cat([v for v, _ in self.pending]))
        labels = all_gather_rows(torch.cat([lab for _, lab in self.pending]))
        keep = labels >= 0
        self.label_queue.enqueue(0, vecs[keep], labels[keep].cpu())
        self.pending.clear()

    # ---- non-finite micro-batches -------------------------------------------------------------
    def drop_micro_batch(self, model: nn.Module) -> None:
        del self.pending[self.pending_before:]  # NaN keys would poison the queue for good
        self.stats.rollback()
        self.micro_in_step -= 1  # the micro-batch that takes its place samples as it would have

    def checked_layers(self, model: nn.Module) -> list[str]:
        return list(self.router_names)

    def first_nonfinite_layer(self, model: nn.Module) -> str | None:
        """The first routing layer whose router output, router weights or expert weights are
        non-finite, in forward order."""
        finite = self.router_finite.tolist() if self.router_finite is not None else []
        layers = dict(routing_layers(model))
        for i, name in enumerate(self.router_names):
            params = [p for p in layers[name].parameters() if p.requires_grad and p.numel()]
            if (i < len(finite) and not finite[i]) or any(
                    not bool(torch.isfinite(p.detach()).all()) for p in params):
                return name
        return None

    # ---- telemetry, checkpoints -------------------------------------------------------------
    def checkpoint_state(self) -> dict:
        return {"routing_stats": self.stats.state_dict()}

    def restore_state(self, state: dict) -> None:
        self.stats.load_state_dict(state["routing_stats"], window="from_rank" not in state)

    def step_metrics(self, model: nn.Module, step: int) -> dict[str, float]:
        metrics = self.stats.flush(all_reduce_sum)
        metrics["moe/queue_mib"] = queue_bytes(model) / 2**20
        metrics["moe/queue_ranks_in_sync"] = float(queues_in_sync(model))
        return metrics

    def write_adapter(self, model: nn.Module, out_dir: Path) -> None:
        save_moe_adapter(model, out_dir, self.cfg, self.base_model, self.dispatch)

    @classmethod
    def load_adapter(cls, model: nn.Module, adapter_dir: Path) -> nn.Module:
        load_moe_adapter(model, adapter_dir)
        return model

    @classmethod
    def export_mode(cls, mode: str, moe_cfg=None) -> str:
        """``auto``: a stock Mixtral for FFN experts (servable anywhere), else the exact
        routed model; ``mixtral`` needs FFN experts."""
        ffn = moe_cfg is not None and moe_cfg.mode == "ffn"
        if mode == "auto":
            return "mixtral" if ffn else "routed"
        mode = super().export_mode(mode)
        if mode == "mixtral" and not ffn:
            raise MethodError("mode mixtral needs an FFN-expert LoRA-MoE (adapter.moe.mode=ffn); "
                              "this one routes every linear (mode=linear); use --mode routed or "
                              "dense")
        return mode

    def on_checkpoint(self, model: nn.Module, ckpt_dir: Path, step: int) -> dict[str, str]:
        if self.rank_map is not None:
            self.rank_map.save(ckpt_dir / RANK_MAP_FILE)  # what a resume restores
        png = self.stats.heatmap(ckpt_dir / "routing_heatmap.png",
                                 f"expert load share, steps up to {step}")
        return {"moe/routing_heatmap": png.name} if png is not None else {}
