"""Routing analysis: which experts each label (department / subject) uses, and how much the
choice of expert tells about the label (mutual information), per routing layer."""

from __future__ import annotations

from pathlib import Path

import torch

from sparsedoc.moe.inject import block_index, routing_layers
from sparsedoc.moe.record import record_routing
from sparsedoc.train.method import model_inputs
from sparsedoc.moe.telemetry import plot_load_heatmap


@torch.no_grad()
def label_expert_counts(model, batches: list[dict], num_labels: int) -> tuple[torch.Tensor, list[str]]:
    """Token-to-expert assignment counts per (routing layer, label, expert) over real tokens.

    Args:
        batches: collated batches with ``input_ids``, ``attention_mask``, ``record_ids`` and
            ``record_label_ids`` (each record of a packed row counts under its own label).
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
        record_ids = batch["record_ids"].reshape(-1)
        real = record_ids >= 0
        tok_labels = batch["record_label_ids"][record_ids[real]]  # (T_real,)
        keep = tok_labels >= 0
        if not keep.any():
            continue
        with record_routing() as record:
            model(**model_inputs({k: v.to(dev) for k, v in batch.items()}))
        for i, (name, _) in enumerate(layers):
            top = record.routing[name].top_idx[real.to(dev)].cpu()  # (T_real, k)
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


def _short_layer(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``3.q``."""
    b = block_index(name)
    leaf = name.rsplit(".", 1)[-1].replace("_proj", "")
    return f"{b}.{leaf}" if b is not None else name


def plot_label_heatmap(share, label_names: list[str], path: Path, title: str) -> Path:
    """Label x expert share of token assignments, each cell annotated (rows sum to 1)."""
    return plot_load_heatmap(share, label_names, path, title, ylabel="label", vmax=1.0,
                             annotate=True, colorbar_label="share")


def plot_label_usage(counts: torch.Tensor, layer_names: list[str], label_names: list[str],
                     out_dir: Path, max_layers: int = 6) -> list[Path]:
    """One PNG heatmap (label x expert share) per routing layer, for up to ``max_layers``
    layers spread over the depth."""
    L = counts.shape[0]
    n = min(L, max_layers)
    picks = sorted({round(i * (L - 1) / max(1, n - 1)) for i in range(n)})
    paths = []
    for i in picks:
        share = counts[i] / counts[i].sum(-1, keepdim=True).clamp_min(1)
        name = layer_names[i].replace(".", "_")
        paths.append(plot_label_heatmap(share.numpy(), label_names,
                                        out_dir / f"routing_{name}.png",
                                        f"layer {_short_layer(layer_names[i])}: expert share "
                                        f"per label"))
    return paths


def plot_mi_per_layer(summary: dict, path: Path, title: str) -> Path:
    """Bar chart of I(label; expert) per routing layer, against H(label) (the maximum)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_layer = summary["mi_bits_per_layer"]
    names = list(per_layer)
    ticks = [_short_layer(n) for n in names]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.14 * len(names) + 2), 3.2))
    ax.bar(range(len(names)), list(per_layer.values()), color="tab:blue")
    ax.axhline(summary["label_entropy_bits"], color="grey", ls="--", lw=1, label="H(label)")
    step = max(1, len(names) // 24)
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels(ticks[::step], fontsize=6, rotation=90)
    ax.set_xlabel("routing layer (block.projection)")
    ax.set_ylabel("I(label; expert) [bits]")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def analyze_routing(model, tokenizer, records: list[dict], out_dir: Path, max_seq_len: int = 512,
                    batch_size: int = 8, max_layers: int = 6) -> dict | None:
    """Per-label expert usage of a LoRA-MoE model on labelled records (department / subject).

    Records are rendered as training renders them (chat template, MCQ as instruction), routed
    teacher-forced, and every real token's top-k experts are counted per label. Writes
    ``routing.json`` (counts, specialisation summary) and PNGs (label x expert share for up to
    ``max_layers`` layers, and I(label; expert) per layer) into ``out_dir``. Returns None, with
    nothing written, when fewer than two labels occur (I(label; expert) is 0 by definition).
    """
    import json

    from sparsedoc.data.collate import PadCollator
    from sparsedoc.data.schema import routing_label
    from sparsedoc.data.tokenize import tokenize_records

    labelled = [r for r in records if routing_label(r)]
    labels = sorted({routing_label(r) for r in labelled})
    if len(labels) < 2:
        return None
    vocab = {lab: i for i, lab in enumerate(labels)}
    rows, stats = tokenize_records(labelled, tokenizer, max_seq_len=max_seq_len,
                                   mcq_with_explanation=False)
    if len({r.label for r in rows}) < 2:  # every record of a label lost its target to truncation
        return None
    collate = PadCollator(tokenizer.pad_token_id, vocab)
    batches = [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    counts, layer_names = label_expert_counts(model, batches, len(labels))
    summary = specialization_summary(counts, layer_names)
    out_dir = Path(out_dir)
    images = plot_label_usage(counts, layer_names, labels, out_dir, max_layers=max_layers)
    images.append(plot_mi_per_layer(summary, out_dir / "routing_mi_per_layer.png",
                                    f"I(label; expert) per layer, {len(labels)} labels, "
                                    f"{len(rows)} records"))
    result = {"labels": labels, "records": len(rows), "truncated": stats.truncated,
              "skipped_no_target": len(stats.skipped_no_target),
              "label_counts": {lab: sum(1 for r in rows if r.label == lab) for lab in labels},
              **summary, "images": [str(p) for p in images],
              "counts": {n: counts[i].tolist() for i, n in enumerate(layer_names)}}
    (out_dir / "routing.json").write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return result
