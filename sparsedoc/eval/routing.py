"""Routing analysis: which experts each label (department / subject) uses, and how much the
choice of expert tells about the label (mutual information), per routing layer."""

from __future__ import annotations

from pathlib import Path

import torch

from sparsedoc.moe.inject import block_index, routing_layers


@torch.no_grad()
def label_expert_counts(model, batches: list[dict], num_labels: int) -> tuple[torch.Tensor, list[str]]:
    """Token-to-expert assignment counts per (routing layer, label, expert) over real tokens.

    Args:
        batches: collated batches with ``input_ids``, ``attention_mask`` and ``seq_label_ids``.
    Returns:
        counts (L, num_labels, E) float64, and the routing layers' names.
    """
    model.eval()
    layers = routing_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA-MoE routing layer")
    E = layers[0][1].num_experts
    counts = torch.zeros(len(layers), num_labels, E, dtype=torch.float64)
    dev = next(model.parameters()).device
    for batch in batches:
        labels = batch["seq_label_ids"]
        if (labels < 0).all():
            continue
        model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev))
        mask = batch["attention_mask"].bool()  # (B, S)
        tok_labels = labels[:, None].expand_as(mask)[mask]  # (T_real,)
        keep = tok_labels >= 0
        for i, (_, layer) in enumerate(layers):
            top = layer.last_routing.top_idx.view(*mask.shape, -1)[mask.to(dev)].cpu()  # (T, k)
            top, lab = top[keep], tok_labels[keep]
            flat = (lab[:, None] * E + top).reshape(-1)
            counts[i] += torch.bincount(flat, minlength=num_labels * E).view(num_labels, E).double()
    return counts, [n for n, _ in layers]


def mutual_information(counts: torch.Tensor) -> torch.Tensor:
    """I(label; expert) in bits from a (..., labels, experts) count table, per leading index."""
    joint = counts / counts.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    p_label = joint.sum(-1, keepdim=True)
    p_expert = joint.sum(-2, keepdim=True)
    ratio = joint / (p_label * p_expert).clamp_min(1e-12)
    terms = torch.where(joint > 0, joint * ratio.clamp_min(1e-12).log2(), torch.zeros_like(joint))
    return terms.sum(dim=(-2, -1))


def specialization_summary(counts: torch.Tensor, layer_names: list[str]) -> dict:
    """Mean and per-layer I(label; expert), and its normalised form I / H(label)."""
    mi = mutual_information(counts)
    p_label = counts.sum(dim=(0, 2)) / counts.sum().clamp_min(1e-12)
    h_label = float(-(p_label[p_label > 0] * p_label[p_label > 0].log2()).sum())
    return {"mi_bits_mean": float(mi.mean()), "mi_bits_max": float(mi.max()),
            "mi_normalised_mean": float(mi.mean()) / h_label if h_label > 0 else 0.0,
            "label_entropy_bits": h_label,
            "mi_bits_per_layer": {n: float(v) for n, v in zip(layer_names, mi)}}


def plot_label_usage(counts: torch.Tensor, layer_names: list[str], label_names: list[str],
                     out_dir: Path, max_layers: int = 6) -> list[Path]:
    """One PNG heatmap (label x expert share) per routing layer, for up to ``max_layers``
    layers spread over the depth."""
    from sparsedoc.moe.telemetry import plot_load_heatmap

    L = counts.shape[0]
    picks = sorted({round(i * (L - 1) / max(1, max_layers - 1)) for i in range(min(L, max_layers))})
    paths = []
    for i in picks:
        share = counts[i] / counts[i].sum(-1, keepdim=True).clamp_min(1)
        b = block_index(layer_names[i])
        name = layer_names[i].replace(".", "_")
        paths.append(plot_load_heatmap(share.numpy(), label_names, out_dir / f"routing_{name}.png",
                                       f"{layer_names[i]} (block {b}): expert share per label",
                                       ylabel="label"))
    return paths
