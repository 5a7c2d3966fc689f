"""Routing analysis: which experts each label (department / subject / source) uses, how much the
top-1 expert tells about the label (mutual information), and how the load spreads, per routing
layer. The same numbers for every LoRA-MoE run: ``sparsedoc evaluate`` and the contrastive
ablation both call ``analyze_routing`` / ``specialization_summary``."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sparsedoc import fsio
from sparsedoc.moe.inject import block_index, routing_layers
from sparsedoc.moe.record import record_routing
from sparsedoc.data.batch import model_inputs
from sparsedoc.moe.telemetry import plot_load_heatmap


@torch.no_grad()
def label_expert_counts(model, batches: list[dict], num_labels: int
                        ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Per routing layer, over the real tokens of labelled records: how often each expert is a
    token's top-1 choice, per label, and how often it is in a token's top-k.

    Args:
        batches: collated batches with ``input_ids``, ``attention_mask``, ``record_ids`` and
            ``record_label_ids`` (each record of a packed row counts under its own label).
    Returns:
        top1 (L, num_labels, E) and assigned (L, E) float64 counts, and the layers' names.
    """
    model.eval()
    layers = routing_layers(model)
    if not layers:
        raise ValueError("the model has no LoRA-MoE routing layer")
    E = layers[0][1].num_experts
    top1 = torch.zeros(len(layers), num_labels, E, dtype=torch.float64)
    assigned = torch.zeros(len(layers), E, dtype=torch.float64)
    dev = next(model.parameters()).device
    for batch in batches:
        record_ids = batch["record_ids"].reshape(-1)
        real = record_ids >= 0
        tok_labels = batch["record_label_ids"][record_ids[real]]  # (T_real,)
        keep = tok_labels >= 0
        if not keep.any():
            continue
        lab = tok_labels[keep]
        with record_routing() as record:
            model(**model_inputs({k: v.to(dev) for k, v in batch.items()}))
        for i, (name, _) in enumerate(layers):
            top = record.routing[name].top_idx[real.to(dev)].cpu()[keep]  # (T, k), best first
            add_counts(top1[i], assigned[i], top, lab)
    return top1, assigned, [n for n, _ in layers]


def add_counts(top1: torch.Tensor, assigned: torch.Tensor, top: torch.Tensor,
               labels: torch.Tensor) -> None:
    """Add one layer's tokens to its count tables, in place: ``top`` (T, k) chosen experts, best
    first, ``labels`` (T,) >= 0; ``top1`` (labels, E), ``assigned`` (E,)."""
    n_labels, E = top1.shape
    top1 += torch.bincount(labels * E + top[:, 0], minlength=n_labels * E).view(n_labels, E)
    assigned += torch.bincount(top.reshape(-1), minlength=E)


def mutual_information(counts: torch.Tensor) -> torch.Tensor:
    """I(label; expert) in bits from a (..., labels, experts) count table, per leading index."""
    joint = counts / counts.sum(dim=(-2, -1), keepdim=True).clamp_min(1e-12)
    p_label = joint.sum(-1, keepdim=True)
    p_expert = joint.sum(-2, keepdim=True)
    ratio = joint / (p_label * p_expert).clamp_min(1e-12)
    terms = torch.where(joint > 0, joint * ratio.clamp_min(1e-12).log2(), torch.zeros_like(joint))
    return terms.sum(dim=(-2, -1))


def _entropy_bits(p: torch.Tensor) -> torch.Tensor:
    """Entropy in bits of distributions along the last dim (zeros contribute nothing)."""
    return -torch.where(p > 0, p * p.clamp_min(1e-300).log2(), torch.zeros_like(p)).sum(-1)


def specialization_summary(top1: torch.Tensor, assigned: torch.Tensor, layer_names: list[str],
                           top_k: int) -> dict:
    """The specialisation metrics, per layer and as means over layers.

    * ``mi_bits``: I(label; top-1 expert) over tokens; ``mi_fraction``: that over H(label) (1.0
      when the top-1 expert determines the label, about 0 when routing ignores it).
    * ``load_entropy_bits``: entropy of the share of top-k assignments per expert (log2 E when
      balanced, 0 when one expert takes all).
    * ``busiest_share``: share of tokens whose top-k holds the busiest expert (k/E balanced,
      1.0 when one expert is in every token's top-k).

    Args:
        top1: (L, labels, E) counts. assigned: (L, E) top-k assignment counts.
    """
    mi = mutual_information(top1)
    label_tokens = top1.sum(dim=(0, 2))
    h_label = float(_entropy_bits(label_tokens / label_tokens.sum().clamp_min(1e-12)))
    load = assigned / assigned.sum(-1, keepdim=True).clamp_min(1e-12)
    load_entropy = _entropy_bits(load)
    tokens = top1.sum(dim=(1, 2)).clamp_min(1e-12)  # (L,) same for every layer
    busiest = assigned.max(-1).values / tokens
    fraction = mi / h_label if h_label > 0 else torch.zeros_like(mi)
    E = assigned.shape[-1]
    return {"mi_bits_mean": float(mi.mean()), "mi_bits_max": float(mi.max()),
            "mi_fraction_mean": float(fraction.mean()), "label_entropy_bits": h_label,
            "load_entropy_bits_mean": float(load_entropy.mean()),
            "load_entropy_max_bits": math.log2(E),
            "busiest_share_mean": float(busiest.mean()), "busiest_share_max": float(busiest.max()),
            "balanced_busiest_share": top_k / E,
            "per_layer": {n: {"mi_bits": float(mi[i]), "mi_fraction": float(fraction[i]),
                              "load_entropy_bits": float(load_entropy[i]),
                              "busiest_share": float(busiest[i])}
                          for i, n in enumerate(layer_names)}}


def _short_layer(name: str) -> str:
    """``model.layers.3.self_attn.q_proj`` -> ``3.q``."""
    b = block_index(name)
    leaf = name.rsplit(".", 1)[-1].replace("_proj", "")
    return f"{b}.{leaf}" if b is not None else name


def layer_groups(layer_names: list[str], max_groups: int = 6) -> list[tuple[str, list[int]]]:
    """Routing layers grouped by decoder block (layers outside a block alone), up to
    ``max_groups`` groups spread evenly over the depth: ``[(title, layer indices)]``."""
    groups: dict[object, list[int]] = {}
    for i, n in enumerate(layer_names):
        b = block_index(n)
        groups.setdefault(b if b is not None else n, []).append(i)
    keys = list(groups)
    n = min(len(keys), max_groups)
    picks = sorted({round(i * (len(keys) - 1) / max(1, n - 1)) for i in range(n)})
    return [(f"block {keys[p]}" if isinstance(keys[p], int) else str(keys[p]), groups[keys[p]])
            for p in picks]


def plot_label_usage(top1: torch.Tensor, layer_names: list[str], label_names: list[str],
                     out_dir: Path, max_groups: int = 6) -> list[Path]:
    """One PNG per layer group (a decoder block): rows are labels, columns the experts of each
    of the block's routing layers side by side; a cell is the share of the label's tokens whose
    top-1 expert it is (each layer's block of columns sums to 1 per row)."""
    import numpy as np

    paths = []
    for title, idx in layer_groups(layer_names, max_groups):
        share = [(top1[i] / top1[i].sum(-1, keepdim=True).clamp_min(1)).numpy() for i in idx]
        grid = np.concatenate(share, axis=1)
        E = top1.shape[-1]
        cols = [f"{_short_layer(layer_names[i]).split('.', 1)[-1]}:{e}" for i in idx
                for e in range(E)]
        path = out_dir / f"routing_{title.replace(' ', '_')}.png"
        paths.append(plot_load_heatmap(grid, label_names, path,
                                       f"{title}: top-1 expert share per label", xlabel=
                                       "layer:expert", ylabel="label", vmax=1.0,
                                       annotate=grid.size <= 200, colorbar_label="share",
                                       col_labels=cols))
    return paths


def plot_mi_per_layer(summary: dict, path: Path, title: str) -> Path:
    """Bar chart of I(label; expert) per routing layer, against H(label) (the maximum)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["per_layer"])
    values = [summary["per_layer"][n]["mi_bits"] for n in names]
    ticks = [_short_layer(n) for n in names]
    fig, ax = plt.subplots(figsize=(max(4.5, 0.14 * len(names) + 2), 3.2))
    ax.bar(range(len(names)), values, color="tab:blue")
    ax.axhline(summary["label_entropy_bits"], color="grey", ls="--", lw=1, label="H(label)")
    step = max(1, len(names) // 24)
    ax.set_xticks(range(0, len(names), step))
    ax.set_xticklabels(ticks[::step], fontsize=6, rotation=90)
    ax.set_xlabel("routing layer (block.projection)")
    ax.set_ylabel("I(label; top-1 expert) [bits]")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fsio.save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def analyze_routing(model, tokenizer, records: list[dict], out_dir: Path, max_seq_len: int = 512,
                    batch_size: int = 8, max_groups: int = 6) -> dict | None:
    """Per-label expert usage of a LoRA-MoE model on labelled records (department / subject).

    Records are rendered as training renders them (chat template, MCQ as instruction), routed
    teacher-forced, and every real token's top-1 and top-k experts are counted per label
    (``schema.routing_label``: meta.label, else subject, else source). Writes ``routing.json``
    (counts, ``specialization_summary``) and PNGs (label x expert share for up to ``max_groups``
    decoder blocks, and I(label; top-1 expert) per layer) into ``out_dir``. Returns None, with
    nothing written, when fewer than two labels occur (the MI is 0 by definition).
    """
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
    if len({r.label for r in rows}) < 2:  # every record of a label was skipped (too long)
        return None
    collate = PadCollator(tokenizer.pad_token_id, vocab)
    batches = [collate(rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    top1, assigned, layer_names = label_expert_counts(model, batches, len(labels))
    top_k = routing_layers(model)[0][1].top_k
    summary = specialization_summary(top1, assigned, layer_names, top_k)
    out_dir = Path(out_dir)
    images = plot_label_usage(top1, layer_names, labels, out_dir, max_groups=max_groups)
    images.append(plot_mi_per_layer(summary, out_dir / "routing_mi_per_layer.png",
                                    f"I(label; top-1 expert) per layer, {len(labels)} labels, "
                                    f"{len(rows)} records"))
    result = {"labels": labels, "records": len(rows), "truncated": stats.truncated,
              "skipped": len(stats.skipped),
              "label_counts": {lab: sum(1 for r in rows if r.label == lab) for lab in labels},
              **summary, "images": [str(p) for p in images],
              "top1_counts": {n: top1[i].tolist() for i, n in enumerate(layer_names)},
              "assigned_counts": {n: assigned[i].tolist() for i, n in enumerate(layer_names)}}
    fsio.write_json(out_dir / "routing.json", result)
    return result
