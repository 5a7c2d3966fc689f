"""LoRA-MoE training method: total loss = LM + balance + z + contrastive, plus telemetry.

After each forward the router outputs are read off the layers (each keeps only its latest);
contrastive keys produced by the micro-batches of a step wait here, detached, and are gathered
from all ranks and enqueued once, after the optimizer step.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from sparsedoc.config import Config, MoECfg
from sparsedoc.models.load import resolve_model_path
from sparsedoc.moe import losses
from sparsedoc.moe.inject import (block_index, inject_lora_moe, moe_layers, routing_layers,
                                  save_moe_adapter)
from sparsedoc.moe.memory_queue import MemoryQueue
from sparsedoc.moe.router import TopKRouter
from sparsedoc.moe.telemetry import RoutingStats
from sparsedoc.train.distributed import all_gather_cat, all_reduce_sum, all_reduce_tensor
from sparsedoc.train.method import Method, model_inputs

log = logging.getLogger("sparsedoc")

LABEL_QUEUE_NAME = "moe_label_queue"


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


def resolve_dispatch(name: str) -> str:
    # "auto" is the measured winner (recipes/benchmark.py, docs/method.md): dense.
    return "dense" if name == "auto" else name


class MoEMethod(Method):
    name = "lora_moe"

    def __init__(self) -> None:
        self.cfg: MoECfg | None = None
        self.seed = 0
        self.pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (vectors, ids) per micro
        self.micro_in_step = 0
        self.stats: RoutingStats | None = None
        self.base_model = ""

    # ---- build ------------------------------------------------------------------------------
    def build(self, model: nn.Module, cfg: Config) -> nn.Module:
        self.cfg, self.seed = cfg.adapter.moe, cfg.train.seed
        self.dispatch = resolve_dispatch(self.cfg.dispatch)
        self.calibration_batches = self.cfg.router_calibration_batches
        self.base_model = resolve_model_path(cfg.model)
        inject_lora_moe(model, self.cfg, self.dispatch)
        # Found once: DeepSpeed wraps the model object, it does not replace its modules.
        self.layers, self.routers = moe_layers(model), routing_layers(model)
        routers = self.routers
        if self.cfg.contrastive == "label":
            dim = len(routers) * self.cfg.num_experts
            # Registered on the model so DeepSpeed checkpoints carry it with the weights.
            model.add_module(LABEL_QUEUE_NAME, MemoryQueue(1, self.cfg.queue_size, dim))
        self.stats = RoutingStats([n for n, _ in routers], self.cfg.num_experts,
                                  [block_index(n) for n, _ in routers],
                                  self.cfg.collapse_threshold, self.cfg.collapse_patience)
        log.info("LoRA-MoE: %d layers wrapped, %d routers, E=%d top-%d r=%d, dispatch=%s, "
                 "contrastive=%s, memory queues %.2f MiB", len(self.layers), len(routers),
                 self.cfg.num_experts, self.cfg.top_k, self.cfg.r, self.dispatch,
                 self.cfg.contrastive, queue_bytes(model) / 2**20)
        return model

    # ---- before the first step -----------------------------------------------------------------
    @torch.no_grad()
    def calibrate(self, engine, batches: list[dict[str, torch.Tensor]]) -> None:
        """Measure each router's mean input direction on ``batches`` (real tokens only, summed
        over ranks) and project it out of the routing (router.py says why)."""
        if not batches:
            return
        routers = [layer.router for _, layer in self.routers]
        for r in routers:
            r.start_calibration()
        was_training = engine.module.training
        engine.eval()
        for batch in batches:
            rows = batch["attention_mask"].reshape(-1).bool()
            for r in routers:
                r.calib_rows = rows
            engine(**model_inputs(batch))
        if was_training:
            engine.train()

        def reduce(total: torch.Tensor, count: int) -> tuple[torch.Tensor, int]:
            both = all_reduce_tensor(torch.cat([total, total.new_tensor([count])]))
            return both[:-1], int(both[-1])

        for r in routers:
            r.finish_calibration(reduce)
        log.info("LoRA-MoE: %d routers calibrated on %d batches per rank (shared input direction "
                 "projected out)", len(routers), len(batches))

    # ---- one micro-batch --------------------------------------------------------------------
    def _sample_tokens(self, mask: torch.Tensor, step: int) -> torch.Tensor:
        """Token rows for the expert-output contrast; seeded by (seed, step, micro) so a resumed
        run samples what the uninterrupted run sampled."""
        valid = mask.reshape(-1).nonzero().squeeze(-1).cpu()
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step * 1_009 + self.micro_in_step)
        n = min(self.cfg.contrastive_tokens, len(valid))
        return valid[torch.randperm(len(valid), generator=g)[:n]]

    def compute_loss(self, engine, batch: dict[str, torch.Tensor], step: int
                     ) -> tuple[torch.Tensor, dict[str, float]]:
        cfg, model = self.cfg, engine.module
        mask = batch["attention_mask"]  # collators always provide it (packed rows too)
        layers = self.layers
        if cfg.contrastive == "expert":
            idx = self._sample_tokens(mask, step)
            for _, layer in layers:
                layer.contrast_index = idx
        out = engine(**model_inputs(batch))
        routers = self.routers
        balance = torch.stack([losses.load_balance_loss(l.last_routing.probs,
                                                        l.last_routing.top_idx, mask)
                               for _, l in routers]).mean()
        z = torch.stack([losses.router_z_loss(l.last_routing.logits, mask)
                         for _, l in routers]).mean()
        contrast, anchors = self._contrastive(model, layers, routers, batch, mask)
        for i, (_, layer) in enumerate(routers):
            self.stats.add(i, layer.last_routing.top_idx, layer.last_routing.probs, mask)
        total = (out.loss + cfg.balance_weight * balance + cfg.z_weight * z
                 + cfg.contrastive_weight * contrast)
        self.micro_in_step += 1
        return total, {"train/lm_loss": float(out.loss.detach()),
                       "moe/balance_loss": float(balance.detach()),
                       "moe/z_loss": float(z.detach()),
                       "moe/contrastive_loss": float(contrast.detach()),
                       "moe/contrastive_anchors": anchors}

    def _contrastive(self, model, layers, routers, batch, mask) -> tuple[torch.Tensor, int]:
        cfg = self.cfg
        zero = batch["input_ids"].new_zeros((), dtype=torch.float32)
        if cfg.contrastive == "none":
            return zero, 0
        if cfg.contrastive == "label":
            seq = torch.cat([l.last_routing.sequence_repr(mask) for _, l in routers], dim=-1)
            labels = batch["seq_label_ids"]
            q_vecs, q_labels = label_queue(model).get(0)
            loss, n = losses.label_contrastive_loss(seq, labels, q_vecs, q_labels,
                                                    cfg.temperature)
            self.pending.append((seq.detach().float(), labels.float().unsqueeze(-1)))
            return loss, n
        # expert-output contrast, one term per wrapped layer, averaged over layers with anchors
        terms, n_total, keys = [], 0, []
        for _, layer in layers:
            reprs, experts = layer.last_contrast
            q_vecs, q_experts = layer.queue.all_entries()
            loss, n = losses.expert_contrastive_loss(reprs, experts, q_vecs, q_experts,
                                                     cfg.temperature)
            if n:
                terms.append(loss)
                n_total += n
            keys.append(torch.cat([reprs.detach().float().reshape(-1, layer.r),
                                   experts.reshape(-1, 1).float()], dim=-1))
            layer.last_contrast = None
        self.pending.append((torch.stack(_pad_rows(keys, cfg.contrastive_tokens * cfg.top_k)),
                             torch.empty(0)))
        return (torch.stack(terms).mean() if terms else zero), n_total

    # ---- after the optimizer step -----------------------------------------------------------
    def after_optimizer_step(self, model: nn.Module, step: int) -> None:
        self.micro_in_step = 0
        if not self.pending:
            return
        cfg = self.cfg
        if cfg.contrastive == "label":
            vecs = all_gather_cat(torch.cat([v for v, _ in self.pending]))
            labels = all_gather_cat(torch.cat([lab for _, lab in self.pending])).squeeze(-1).long()
            keep = labels >= 0
            label_queue(model).enqueue(0, vecs[keep], labels[keep].cpu())
        elif cfg.contrastive == "expert":
            # (micro, layers, rows, r+1) from every rank, in rank order: identical on all ranks
            keys = all_gather_cat(torch.stack([k for k, _ in self.pending]))
            for li, (_, layer) in enumerate(self.layers):
                rows = keys[:, li].reshape(-1, layer.r + 1)
                experts = rows[:, -1].long()
                for e in range(layer.num_experts):
                    layer.queue.enqueue(e, rows[experts == e, :-1])
        self.pending.clear()

    # ---- telemetry, checkpoints -------------------------------------------------------------
    def step_metrics(self, model: nn.Module, step: int) -> dict[str, float]:
        metrics = self.stats.flush(all_reduce_sum)
        metrics["moe/queue_mib"] = queue_bytes(model) / 2**20
        metrics["moe/queue_ranks_in_sync"] = float(queues_in_sync(model))
        return metrics

    def write_adapter(self, model: nn.Module, out_dir: Path) -> None:
        save_moe_adapter(model, out_dir, self.cfg, self.base_model, self.dispatch)

    def on_checkpoint(self, model: nn.Module, ckpt_dir: Path, step: int) -> dict[str, str]:
        png = self.stats.heatmap(ckpt_dir / "routing_heatmap.png",
                                 f"expert load share, steps up to {step}")
        return {"moe/routing_heatmap": png.name} if png is not None else {}


def _pad_rows(keys: list[torch.Tensor], rows: int) -> list[torch.Tensor]:
    """Pad each layer's (n, r+1) key block to ``rows`` rows with expert id -1 (ignored), so
    every rank gathers tensors of one shape even when a micro-batch has few real tokens."""
    out = []
    for k in keys:
        if len(k) < rows:
            pad = k.new_zeros(rows - len(k), k.shape[1])
            pad[:, -1] = -1
            k = torch.cat([k, pad])
        out.append(k)
    return out
