"""Router and expert losses: pure functions of tensors and masks (no model, no state).

Formulas, with the reasoning, are in ``docs/method.md``. Masks are 1 for real tokens and 0 for
padding; padded tokens never count.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _flat_mask(mask: torch.Tensor | None, n: int, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(n, device=device)
    m = mask.reshape(-1).to(device=device, dtype=torch.float32)
    if m.numel() != n:
        raise ValueError(f"mask has {m.numel()} entries for {n} tokens")
    return m


def load_balance_loss(probs: torch.Tensor, top_idx: torch.Tensor,
                      mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral auxiliary loss ``E * sum_e f_e * P_e``.

    ``f_e``: share of the T*k token-to-expert assignments that went to expert e (no gradient);
    ``P_e``: mean router probability of expert e. Equals 1.0 at a perfectly uniform routing and
    grows to E when one expert takes everything.

    Args:
        probs: (T, E) router softmax. top_idx: (T, k) chosen experts. mask: (T,) or (B, S).
    """
    T, E = probs.shape
    m = _flat_mask(mask, T, probs.device)
    denom = m.sum().clamp_min(1.0)
    assign = F.one_hot(top_idx, E).float().sum(1)  # (T, E): 1 where chosen
    f = (assign * m[:, None]).sum(0) / (denom * top_idx.shape[1])
    P = (probs.float() * m[:, None]).sum(0) / denom
    return E * (f * P).sum()


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean of logsumexp(logits)^2 over real tokens; keeps logits small."""
    m = _flat_mask(mask, logits.shape[0], logits.device)
    z = torch.logsumexp(logits.float(), dim=-1) ** 2
    return (z * m).sum() / m.sum().clamp_min(1.0)


def supcon_loss(anchors: torch.Tensor, anchor_labels: torch.Tensor, bank: torch.Tensor,
                bank_labels: torch.Tensor, temperature: float,
                exclude: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """Supervised contrastive (InfoNCE with several positives) of anchors against a bank.

    For anchor a with label y: ``-1/|P| sum_{p in P} log( exp(a.p/t) / sum_{b in bank} exp(a.b/t) )``
    with P the bank entries labelled y. Vectors are L2-normalised here. Anchors with no positive
    in the bank (or label < 0) are left out; the count of anchors used is returned with the mean.

    Args:
        anchors: (n, d), with gradient. anchor_labels: (n,).
        bank: (m, d), usually detached (queue, other in-batch rows). bank_labels: (m,).
        exclude: optional (n, m) bool, True where a bank entry must not count for an anchor
            (e.g. the anchor itself when the batch is part of the bank).
    """
    if anchors.numel() == 0 or bank.numel() == 0:
        return anchors.sum() * 0.0, 0
    a = F.normalize(anchors.float(), dim=-1)
    b = F.normalize(bank.float(), dim=-1).to(a.device)
    logits = a @ b.t() / temperature  # (n, m)
    bank_labels = bank_labels.to(anchor_labels.device)
    pos = (anchor_labels[:, None] == bank_labels[None, :]) & (anchor_labels[:, None] >= 0)
    if exclude is not None:
        logits = logits.masked_fill(exclude, float("-inf"))
        pos = pos & ~exclude
    n_pos = pos.sum(1)
    keep = n_pos > 0
    if not keep.any():
        return anchors.sum() * 0.0, 0
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    per_anchor = -log_prob.masked_fill(~pos, 0.0).sum(1)[keep] / n_pos[keep]
    return per_anchor.mean(), int(keep.sum())


def expert_contrastive_loss(reprs: torch.Tensor, experts: torch.Tensor, queue_vecs: torch.Tensor,
                            queue_experts: torch.Tensor, temperature: float
                            ) -> tuple[torch.Tensor, int]:
    """Expert-output contrast (formulation 1).

    Each activated expert's low-rank output ``A_e x`` for a sampled token is an anchor; the
    queue's past outputs of the same expert are positives and the other experts' past outputs are
    negatives, so the inactive experts never run on the current tokens.

    Args:
        reprs: (n, k, r) activated experts' outputs. experts: (n, k) their ids.
        queue_vecs: (m, r) past outputs. queue_experts: (m,) which expert produced each.
    """
    return supcon_loss(reprs.reshape(-1, reprs.shape[-1]), experts.reshape(-1), queue_vecs,
                       queue_experts, temperature)


def label_contrastive_loss(seq_repr: torch.Tensor, seq_labels: torch.Tensor,
                           queue_vecs: torch.Tensor, queue_labels: torch.Tensor,
                           temperature: float) -> tuple[torch.Tensor, int]:
    """Label-supervised router contrast (formulation 2, SupCon with a MoCo-style queue).

    Sequences sharing ``meta.label`` pull their routing representations together. The bank is
    the other sequences of the batch (detached) plus the queue of past sequences.

    Args:
        seq_repr: (B, d) routing representation per sequence. seq_labels: (B,), -1 = unlabelled.
        queue_vecs: (m, d). queue_labels: (m,).
    """
    B = seq_repr.shape[0]
    # Other rows of the batch join the bank (detached); a row is never its own positive.
    bank = torch.cat([seq_repr.detach().float(), queue_vecs.float().to(seq_repr.device)])
    bank_labels = torch.cat([seq_labels, queue_labels.to(seq_labels.device)])
    exclude = torch.zeros(B, bank.shape[0], dtype=torch.bool, device=seq_repr.device)
    exclude[:, :B] = torch.eye(B, dtype=torch.bool, device=seq_repr.device)
    return supcon_loss(seq_repr, seq_labels, bank, bank_labels, temperature, exclude)
