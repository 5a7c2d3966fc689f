"""Routing telemetry: expert load per decoder layer, entropy, busiest-expert share, collapse
warnings, and the layer x expert load heatmap saved with each checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from sparsedoc import fsio

log = logging.getLogger("sparsedoc")


class RoutingStats:
    """Accumulates token-to-expert assignment counts per routing layer between log steps."""

    def __init__(self, layer_names: list[str], num_experts: int, block_of: list[int | None],
                 collapse_threshold: float, collapse_patience: int):
        self.layer_names, self.E = layer_names, num_experts
        self.block_of = block_of
        self.threshold, self.patience = collapse_threshold, collapse_patience
        self.counts = torch.zeros(len(layer_names), num_experts, dtype=torch.float64)
        self.entropy_sum = torch.zeros(len(layer_names), dtype=torch.float64)
        self.tokens = torch.zeros(len(layer_names), dtype=torch.float64)
        self.since_checkpoint = torch.zeros_like(self.counts)
        self.collapsed_for = 0
        self._mark: tuple[torch.Tensor, ...] | None = None

    # ---- a micro-batch that is skipped (non-finite) leaves no trace --------------------------
    def mark(self) -> None:
        """Remember the window so far: ``rollback`` returns to it."""
        self._mark = (self.counts.clone(), self.entropy_sum.clone(), self.tokens.clone())

    def rollback(self) -> None:
        if self._mark is not None:
            self.counts, self.entropy_sum, self.tokens = self._mark
            self._mark = None

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        """This rank's telemetry as JSON-able data: the window not yet logged (per rank) and
        how many logged steps the collapse has lasted (the same on every rank). The load since
        the last checkpoint is not kept: the checkpoint's heatmap has just consumed it."""
        self._on_host()
        return {"layers": self.layer_names, "counts": self.counts.tolist(),
                "entropy_sum": self.entropy_sum.tolist(), "tokens": self.tokens.tolist(),
                "collapsed_for": self.collapsed_for}

    def load_state_dict(self, state: dict, window: bool = True) -> None:
        """Restore ``state_dict``; ``window=False`` keeps only the collapse count (the state of
        another rank, after a change of world size)."""
        if state.get("layers") != self.layer_names:
            raise ValueError("routing telemetry in the checkpoint is for other routing layers")
        self.collapsed_for = int(state["collapsed_for"])
        self.since_checkpoint.zero_()
        if window:
            self.counts = torch.tensor(state["counts"], dtype=torch.float64)
            self.entropy_sum = torch.tensor(state["entropy_sum"], dtype=torch.float64)
            self.tokens = torch.tensor(state["tokens"], dtype=torch.float64)

    def add(self, layers: int | slice, top_idx: torch.Tensor, probs: torch.Tensor,
            mask: torch.Tensor) -> None:
        """Count one micro-batch's routing: of one layer (``layers`` an index, ``top_idx``
        (T, k), ``probs`` (T, E)) or of all layers at once (``slice(None)``, inputs stacked
        (L, T, k) and (L, T, E)). The sums stay on the routing's device: no host sync per step;
        they reach the host when logged or checkpointed."""
        if isinstance(layers, int):
            layers, top_idx, probs = slice(layers, layers + 1), top_idx[None], probs[None]
        dev = probs.device
        if self.counts.device != dev:
            self.counts, self.entropy_sum, self.tokens = (
                t.to(dev) for t in (self.counts, self.entropy_sum, self.tokens))
        L, T, k = top_idx.shape
        m = mask.reshape(-1).to(device=dev, dtype=torch.float64)
        counts = torch.zeros(L, self.E, dtype=torch.float64, device=dev)
        counts.scatter_add_(1, top_idx.reshape(L, T * k),
                            m.repeat_interleave(k).expand(L, T * k).contiguous())
        p = probs.detach().double()
        ent = -(p * p.clamp_min(1e-12).log()).sum(-1)  # (L, T)
        self.counts[layers] += counts
        self.entropy_sum[layers] += ent @ m
        self.tokens[layers] += m.sum()

    def _on_host(self) -> None:
        self.counts, self.entropy_sum, self.tokens = (
            t.cpu() for t in (self.counts, self.entropy_sum, self.tokens))

    def flush(self, reduce) -> dict[str, float]:
        """Metrics for the window since the last flush; ``reduce`` sums lists across ranks."""
        self._on_host()
        flat = self.counts.flatten().tolist() + self.entropy_sum.tolist() + self.tokens.tolist()
        flat = reduce(flat)
        L, E = self.counts.shape
        counts = torch.tensor(flat[: L * E], dtype=torch.float64).view(L, E)
        entropy = torch.tensor(flat[L * E: L * E + L], dtype=torch.float64)
        tokens = torch.tensor(flat[L * E + L:], dtype=torch.float64)
        self.since_checkpoint += counts
        self.counts.zero_()
        self.entropy_sum.zero_()
        self.tokens.zero_()
        if tokens.sum() == 0:
            return {}
        load = counts / counts.sum(1, keepdim=True).clamp_min(1)  # (L, E) share of assignments
        # share of a layer's tokens that its busiest expert receives: k/E when balanced, 1.0
        # when one expert is in every token's top-k (collapse), whatever k is
        busiest = counts.max(1).values / tokens.clamp_min(1)  # (L,)
        metrics = {"moe/routing_entropy": float((entropy / tokens.clamp_min(1)).mean()),
                   "moe/busiest_expert_share": float(busiest.max()),
                   "moe/busiest_expert_share_mean": float(busiest.mean()),
                   # routing layers whose busiest expert is above the collapse threshold
                   "moe/layers_over_threshold": float((busiest > self.threshold).sum()),
                   "moe/dropped_token_frac": 0.0}  # no capacity limit: no token is ever dropped
        for b, row in self.block_load(load).items():
            for e, v in enumerate(row.tolist()):
                metrics[f"moe/load/layer{b:02d}/expert{e}"] = v
        collapsed = float(busiest.max()) > self.threshold
        self.collapsed_for = self.collapsed_for + 1 if collapsed else 0
        metrics["moe/collapse"] = float(self.collapsed_for >= self.patience)
        if self.collapsed_for == self.patience:
            worst = int(busiest.argmax())
            log.warning("expert collapse: in %s one expert has received %.0f%% of tokens for %d "
                        "logged steps (threshold %.0f%%); consider a larger balance_weight or "
                        "router_jitter", self.layer_names[worst], 100 * float(busiest[worst]),
                        self.patience, 100 * self.threshold)
        return metrics

    def block_load(self, load: torch.Tensor) -> dict[int, torch.Tensor]:
        """Average the per-module load into one row per decoder block (modules without a block
        index get their own negative row ids)."""
        rows: dict[int, list[torch.Tensor]] = {}
        for i, b in enumerate(self.block_of):
            rows.setdefault(b if b is not None else -1 - i, []).append(load[i])
        return {b: torch.stack(v).mean(0) for b, v in sorted(rows.items())}

    def heatmap(self, path: Path, title: str) -> Path | None:
        """PNG of the expert load share (blocks x experts) since the last checkpoint."""
        counts = self.since_checkpoint
        if counts.sum() == 0:
            return None
        load = counts / counts.sum(1, keepdim=True).clamp_min(1)
        rows = self.block_load(load)
        grid = torch.stack(list(rows.values())).numpy()
        self.since_checkpoint.zero_()
        return plot_load_heatmap(grid, [str(b) for b in rows], path, title)


def plot_load_heatmap(grid, row_labels: list[str], path: Path, title: str,
                      xlabel: str = "expert", ylabel: str = "decoder layer",
                      vmax: float | None = None, annotate: bool = False,
                      colorbar_label: str = "share of token assignments",
                      col_labels: list[str] | None = None, value_format: str = ".2f") -> Path:
    """A rows x experts share heatmap as PNG. ``vmax`` None scales to the data; ``annotate``
    writes each value in its cell (small grids only, as ``value_format``); ``col_labels``
    names the columns."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = grid.shape
    size = ((max(4.5, 1.8 + 0.7 * cols), max(2.6, 1.3 + 0.38 * rows)) if annotate
            else (min(24.0, 1.2 + (0.6 if cols <= 16 else 0.25) * cols), 1.0 + 0.28 * rows))
    fig, ax = plt.subplots(figsize=size)
    top = vmax if vmax is not None else max(float(grid.max()), 1e-6)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.0, vmax=top)
    ax.set_xticks(range(cols))
    if col_labels is not None:
        ax.set_xticklabels(col_labels, fontsize=6, rotation=90)
    ax.set_yticks(range(rows))
    ax.set_yticklabels(row_labels, fontsize=7)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    if annotate and rows * cols <= 200:
        for r in range(rows):
            for c in range(cols):
                ax.text(c, r, format(grid[r, c], value_format), ha="center", va="center", fontsize=6,
                        color="white" if grid[r, c] < 0.6 * top else "black")
    fig.colorbar(im, ax=ax, label=colorbar_label)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fsio.save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path
