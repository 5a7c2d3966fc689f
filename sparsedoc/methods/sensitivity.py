"""Sensitivity-based rank allocation (Sensitivity-LoRA, arXiv 2509.09119): how much LoRA rank
each target weight matrix gets, decided once from a few calibration batches before training.

Three pure steps, each testable on its own (docs/method.md, "Sensitivity-LoRA", says why each
choice was made and what it costs):

1. ``fisher_diagonal``: the empirical-Fisher diagonal of every target matrix,
   ``F_W = sum over rows n of (dL_n/dW)^2 / tokens`` with L_n the row's token-summed loss (one
   backward per calibration row, the base model frozen apart from the requested gradients). For a log-likelihood loss the Fisher equals the
   Gauss-Newton part of the Hessian, so ``F_W`` is a cheap estimate of the Hessian diagonal.
2. ``matrix_sensitivity``: a **global** sensitivity, the trace of ``F_W`` (how much the loss
   reacts to this matrix as a whole), and a **local** one, the effective rank of the matrix of
   per-element RMS gradients ``sqrt(F_W)`` (over how many directions that reaction is spread,
   i.e. how much a higher rank can still pick up), combined as a weighted geometric mean of the
   two, each normalised by its mean over the matrices.
3. ``allocate_ranks``: integer ranks proportional to the combined score under a total budget of
   trainable parameters (rank r on an (out, in) matrix costs r * (in + out)), each inside
   [min_rank, max_rank]; deterministic (ties go to the earlier module).

The rank map (``RankMap``) is plain data: saved as JSON in the run folder and in every
checkpoint, applied through peft's ``rank_pattern`` / ``alpha_pattern`` (or the LoRA-MoE's
per-module expert rank), drawn by ``plot_rank_map``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from sparsedoc import fsio
from sparsedoc.data.batch import model_inputs
from sparsedoc.errors import UserError
from sparsedoc.models.load import is_encoder_decoder
from sparsedoc.moe.inject import block_index, matches_target

RANK_MAP_FILE = "rank_map.json"
RANK_PLOT_FILE = "rank_map.png"


class AllocationError(UserError, ValueError):
    """The budget cannot hold the per-matrix bounds (the message names the fields)."""


# ---- 1. the estimator ----------------------------------------------------------------------------
def target_linears(model: nn.Module, targets: list[str]) -> dict[str, nn.Linear]:
    """The frozen linears a LoRA on ``targets`` adapts (peft's suffix match), in model order."""
    found = {n: m for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and matches_target(n, targets)}
    if not found:
        names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                        if isinstance(m, nn.Linear)})
        raise UserError(f"target_modules={targets} matched no linear layer; this model's linear "
                        f"names are: {names}")
    return found


def target_mask(labels: torch.Tensor, seq2seq: bool) -> torch.Tensor:
    """Which labels are predicted: a decoder's are its next tokens (``labels[:, 1:]``, the
    shift transformers' causal loss makes); an encoder-decoder's decoder labels are all
    predicted as they stand (its loss does not shift)."""
    return (labels if seq2seq else labels[:, 1:]) != -100


def split_rows(batch: dict[str, torch.Tensor], seq2seq: bool = False
               ) -> list[dict[str, torch.Tensor]]:
    """One single-row batch per row that has target tokens (filler rows have none)."""
    rows = []
    for i in range(batch["input_ids"].shape[0]):
        row = {k: v[i:i + 1] for k, v in batch.items() if torch.is_tensor(v) and v.dim() >= 1
               and v.shape[0] == batch["input_ids"].shape[0]}
        if target_mask(row["labels"], seq2seq).any():
            rows.append(row)
    return rows


def lm_loss(labels: str = "data", seed: int = 0) -> Callable:
    """The loss whose squared gradients ``fisher_diagonal`` sums: the causal-LM loss of one row
    summed over its target tokens, with their count, against the data's next tokens (``data``:
    the empirical Fisher) or against tokens sampled from the model's own prediction at each
    target position (``model``: a one-sample Monte-Carlo estimate of the true Fisher, which
    equals the Gauss-Newton matrix)."""
    if labels not in ("data", "model"):
        raise ValueError(f"labels: expected 'data' or 'model', got {labels!r}")
    gen = torch.Generator().manual_seed(seed)

    def loss(model, row: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
        seq2seq = is_encoder_decoder(model)
        keep = target_mask(row["labels"], seq2seq)  # (1, T): the predicted labels
        n = int(keep.sum())
        if labels == "data":
            return model(**model_inputs(row)).loss * n, n  # HF's loss: the mean over targets
        inputs = {k: v for k, v in model_inputs(row).items() if k != "labels"}
        if seq2seq:  # the decoder reads the labels shifted right; its logits align with them
            inputs["labels"] = row["labels"]
            logits = model(**inputs).logits.float()  # (1, T, V)
        else:
            logits = model(**inputs).logits[:, :-1].float()  # (1, S-1, V): tokens 1..S-1
        probs = logits.detach()[keep].softmax(-1).cpu()  # (n, V)
        sampled = torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(logits.device)
        return nn.functional.cross_entropy(logits[keep], sampled, reduction="sum"), n

    return loss


def _zero3_gathered(model: nn.Module):
    """A context in which every parameter of a ZeRO-3 partitioned model (built under
    ``zero.Init`` before ``deepspeed.initialize``) is whole on this rank; a no-op otherwise."""
    import contextlib

    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def fisher_diagonal(model: nn.Module, weights: dict[str, torch.Tensor],
                    batches: list[dict[str, torch.Tensor]], loss_fn: Callable
                    ) -> tuple[dict[str, torch.Tensor], int]:
    """The Fisher diagonal of the mean token loss: sum over calibration rows of the squared
    gradient of the row's token-summed loss, over the number of target tokens.
    ``loss_fn(model, row)`` returns (summed loss, target tokens); ``weights``: name ->
    parameter. Returns (name -> fp32 tensor of the parameter's shape, on CPU; rows used).

    Each row gets its own backward: the square of a whole batch's gradient would add the
    squared mean gradient of the batch to the Fisher. Summed, not averaged, over a row's
    tokens: E[(sum_t g_t)^2] = sum_t E[g_t^2] when the labels follow the model, so a row's
    weight is its token count, as in the training loss. Parameters keep their
    ``requires_grad`` and ``.grad`` (``torch.autograd.grad``)."""
    was_training = model.training
    model.eval()  # no dropout: the sensitivity of the model that training starts from
    seq2seq = is_encoder_decoder(model)
    rows = [r for b in batches for r in split_rows(b, seq2seq)]
    with _zero3_gathered(model):
        names, params = list(weights), [weights[n] for n in weights]
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        sums = [torch.zeros(p.shape, dtype=torch.float32, device=p.device) for p in params]
        tokens = 0
        try:
            for row in rows:
                loss, n = loss_fn(model, row)
                tokens += n
                grads = torch.autograd.grad(loss, params, allow_unused=True)
                for s, g in zip(sums, grads):
                    if g is not None:
                        s.add_(g.float().square())
        finally:
            for p, f in zip(params, flags):
                p.requires_grad_(f)
            model.train(was_training)
        out = {n: (s / max(tokens, 1)).cpu() for n, s in zip(names, sums)}
    return out, len(rows)


# ---- 2. global and local sensitivity -------------------------------------------------------------
def effective_rank(matrix: torch.Tensor) -> float:
    """exp(entropy of the normalised singular values) (Roy & Vetterli 2007): 1 for a rank-1
    matrix, min(out, in) for one whose singular values are all equal; 0 for a zero matrix.

    The singular values come from the eigenvalues of the smaller Gram matrix (an fp32 matmul,
    then a float64 ``eigvalsh`` of min(out, in) squared): about 20x faster than ``svdvals`` on
    SmolLM2's (1536, 576) matrices on CPU (the entropy agreed to 1e-7 there). The fp32 Gram
    is exact only down to its noise floor, so eigenvalues below k * eps_fp32 * the largest
    (singular values under sqrt(k * eps) ~ 1% of the largest at k = 576) count as 0."""
    m = matrix.float()
    gram = m @ m.t() if m.shape[0] <= m.shape[1] else m.t() @ m  # (k, k), k = min(out, in)
    lam = torch.linalg.eigvalsh(gram.double())
    floor = gram.shape[0] * torch.finfo(torch.float32).eps * lam.max().clamp_min(0)
    s = torch.where(lam > floor, lam, torch.zeros_like(lam)).sqrt()
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def matrix_sensitivity(fisher: torch.Tensor) -> tuple[float, float]:
    """(global, local) sensitivity of one matrix from its Fisher diagonal: the trace, and the
    effective rank of the RMS-gradient matrix ``sqrt(F)``."""
    return float(fisher.double().sum()), effective_rank(fisher.clamp_min(0).sqrt())


def combine(global_s: list[float], local_s: list[float], local_weight: float) -> list[float]:
    """score_i = (g_i / mean g) ** (1 - w) * (l_i / mean l) ** w. With w = 0 the ranks follow
    the trace alone; a matrix with no gradient at all scores 0."""
    gm = sum(global_s) / len(global_s) or 1.0
    lm = sum(local_s) / len(local_s) or 1.0
    return [(g / gm) ** (1 - local_weight) * (loc / lm) ** local_weight
            if g > 0 and loc > 0 else 0.0 for g, loc in zip(global_s, local_s)]


# ---- 3. the allocation ---------------------------------------------------------------------------
def allocate_ranks(scores: list[float], costs: list[int], budget: int, min_rank: int,
                   max_rank: int) -> list[int]:
    """Integer ranks ~ proportional to ``scores`` with sum(r_i * costs_i) <= budget and
    min_rank <= r_i <= max_rank, spending as much of the budget as the bounds allow.

    Water-filling: the continuous solution r_i = clip(t * score_i) with t found by bisection,
    floored, then the leftover budget goes one rank at a time to the largest shortfall
    (continuous rank minus integer rank; ties to the earlier module) that still fits.
    """
    if not scores:
        return []
    if min_rank < 0 or max_rank < max(min_rank, 1):
        raise AllocationError(f"min_rank={min_rank}, max_rank={max_rank}: expected "
                              f"0 <= min_rank <= max_rank and max_rank >= 1")
    floor_cost = min_rank * sum(costs)
    if floor_cost > budget:
        raise AllocationError(f"budget={budget:,} trainable parameters cannot give every one of "
                              f"the {len(scores)} matrices min_rank={min_rank} (needs "
                              f"{floor_cost:,}); lower min_rank or raise the budget")

    def spent(t: float) -> float:
        return sum(min(max(t * s, min_rank), max_rank) * c for s, c in zip(scores, costs))

    if sum(scores) == 0:  # no signal at all: uniform
        cont = [float(min(max_rank, max(min_rank, budget // sum(costs))))] * len(scores)
    else:
        lo, hi = 0.0, 1.0
        while spent(hi) < budget and hi < 1e18:
            hi *= 2
        for _ in range(200):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if spent(mid) <= budget else (lo, mid)
        cont = [min(max(lo * s, min_rank), max_rank) for s in scores]
    ranks = [int(math.floor(c + 1e-9)) for c in cont]
    left = budget - sum(r * c for r, c in zip(ranks, costs))
    while True:  # one rank at a time to the largest shortfall that still fits
        fits = [i for i in range(len(ranks)) if ranks[i] < max_rank and costs[i] <= left]
        if not fits:
            return ranks
        i = min(fits, key=lambda j: (-(cont[j] - ranks[j]), j))
        ranks[i] += 1
        left -= costs[i]


# ---- the rank map -------------------------------------------------------------------------------
@dataclass
class RankMap:
    """Per-module ranks and the sensitivities they came from, as saved in ``rank_map.json``."""

    ranks: dict[str, int]  # module name -> rank (experts' rank for the LoRA-MoE)
    shapes: dict[str, list[int]]  # module name -> [out, in]
    global_sensitivity: dict[str, float]
    local_sensitivity: dict[str, float]
    score: dict[str, float]
    budget: int  # trainable-parameter budget of the adapter matrices
    uniform_rank: int  # the uniform LoRA rank the default budget is taken from
    min_rank: int
    max_rank: int
    settings: dict = field(default_factory=dict)  # estimator settings (labels, rows, weights)
    calibration_seconds: float = 0.0

    @property
    def params(self) -> int:
        """Adapter parameters the map spends (per expert for the LoRA-MoE)."""
        return sum(r * sum(self.shapes[n]) for n, r in self.ranks.items())

    def alphas(self, alpha: float, mode: str) -> dict[str, float]:
        """peft's ``alpha_pattern``: ``scale`` keeps alpha / r at the uniform LoRA's value, so
        every matrix's update has the same scale per rank; ``fixed`` keeps alpha itself."""
        if mode == "fixed":
            return {n: float(alpha) for n in self.ranks}
        return {n: float(alpha) * r / self.uniform_rank for n, r in self.ranks.items()}

    def summary(self) -> dict:
        """Short facts for logs and the model card."""
        rs = sorted(self.ranks.values())
        by_proj: dict[str, list[int]] = {}
        for n, r in self.ranks.items():
            by_proj.setdefault(n.rsplit(".", 1)[-1], []).append(r)
        return {"matrices": len(rs), "min": rs[0], "median": rs[len(rs) // 2], "max": rs[-1],
                "params": self.params, "budget": self.budget,
                "uniform_rank": self.uniform_rank,
                "mean_rank_by_projection": {p: round(sum(v) / len(v), 2)
                                            for p, v in by_proj.items()}}

    def save(self, path: str | Path) -> Path:
        fsio.write_json(Path(path), asdict(self))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> "RankMap":
        path = Path(path)
        if not path.is_file():
            raise UserError(f"{path}: missing; a Sensitivity-LoRA checkpoint keeps the rank map "
                            f"it was trained with there")
        import json

        return cls(**json.loads(path.read_text(encoding="utf-8")))


def uniform_budget(shapes: dict[str, list[int]], r: int) -> int:
    """Trainable parameters of a uniform rank-r LoRA on these (out, in) matrices."""
    return r * sum(o + i for o, i in shapes.values())


def estimate_rank_map(model: nn.Module, targets: list[str], batches: list[dict], *,
                      uniform_rank: int, budget: int = 0, min_rank: int = 1,
                      max_rank: int = 64, local_weight: float = 0.5, labels: str = "data",
                      seed: int = 0, loss_fn: Callable | None = None) -> RankMap:
    """The whole pipeline on ``model`` (the frozen base, before any adapter is put in):
    Fisher diagonal on ``batches``, sensitivities, allocation. ``budget`` 0: the trainable
    parameters of a uniform-rank LoRA with ``uniform_rank``."""
    start = time.perf_counter()
    linears = target_linears(model, targets)
    weights = {n: m.weight for n, m in linears.items()}
    shapes = {n: [m.out_features, m.in_features] for n, m in linears.items()}
    fisher, rows = fisher_diagonal(model, weights, batches, loss_fn or lm_loss(labels, seed))
    if rows == 0:
        raise UserError("sensitivity calibration found no row with target tokens in the "
                        "calibration batches; check data.train_files")
    fisher_seconds = time.perf_counter() - start
    glob, loc = {}, {}
    for n in linears:
        glob[n], loc[n] = matrix_sensitivity(fisher[n])
    svd_seconds = time.perf_counter() - start - fisher_seconds
    names = list(linears)
    scores = combine([glob[n] for n in names], [loc[n] for n in names], local_weight)
    budget = budget or uniform_budget(shapes, uniform_rank)
    try:
        ranks = allocate_ranks(scores, [sum(shapes[n]) for n in names], budget, min_rank,
                               max_rank)
    except AllocationError as e:
        raise AllocationError(f"adapter.sensitivity: {e}") from None
    return RankMap(ranks=dict(zip(names, ranks)), shapes=shapes, global_sensitivity=glob,
                   local_sensitivity=loc, score=dict(zip(names, scores)), budget=budget,
                   uniform_rank=uniform_rank, min_rank=min_rank, max_rank=max_rank,
                   settings={"estimator": "empirical Fisher diagonal, one backward per row",
                             "labels": labels, "rows": rows, "local_weight": local_weight,
                             "seed": seed, "fisher_seconds": round(fisher_seconds, 3),
                             "svd_seconds": round(svd_seconds, 3)},
                   calibration_seconds=time.perf_counter() - start)


def plot_rank_map(rank_map: RankMap, path: str | Path, title: str = "") -> Path:
    """Heatmap of the ranks, decoder layer x projection (PNG)."""
    from sparsedoc.moe.telemetry import plot_load_heatmap

    projs: list[str] = []
    layers: list[str] = []
    for n in rank_map.ranks:
        p, b = n.rsplit(".", 1)[-1], block_index(n)
        if p not in projs:
            projs.append(p)
        key = str(b) if b is not None else re.sub(r"\.[^.]+$", "", n)
        if key not in layers:
            layers.append(key)
    grid = torch.full((len(layers), len(projs)), float("nan"))
    for n, r in rank_map.ranks.items():
        b = block_index(n)
        key = str(b) if b is not None else re.sub(r"\.[^.]+$", "", n)
        grid[layers.index(key), projs.index(n.rsplit(".", 1)[-1])] = r
    return plot_load_heatmap(grid.nan_to_num(0).numpy(), layers, Path(path),
                             title or f"Sensitivity-LoRA ranks (uniform r={rank_map.uniform_rank}"
                             f", {rank_map.params:,} of {rank_map.budget:,} params)",
                             xlabel="projection", vmax=float(rank_map.max_rank),
                             annotate=True, colorbar_label="LoRA rank", col_labels=projs,
                             value_format=".0f")
