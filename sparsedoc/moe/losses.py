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
                exclude: torch.Tensor | None = None, normalize: bool = True
                ) -> tuple[torch.Tensor, int]:
    """Supervised contrastive (InfoNCE with several positives) of anchors against a bank.

    For anchor a with label y: ``-1/|P| sum_{p in P} log( exp(a.p/t) / sum_{b in bank} exp(a.b/t) )``
    with P the bank entries labelled y. With ``normalize`` the vectors are L2-normalised first
    (cosine similarity); without, the plain dot product is the similarity. Anchors with no
    positive in the bank (or label < 0) are left out; the count of anchors used is returned.

    Args:
        anchors: (n, d), with gradient. anchor_labels: (n,).
        bank: (m, d), usually detached (queue, other in-batch rows). bank_labels: (m,).
        exclude: optional (n, m) bool, True where a bank entry must not count for an anchor
            (e.g. the anchor itself when the batch is part of the bank).
    """
    if anchors.numel() == 0 or bank.numel() == 0:
        return anchors.sum() * 0.0, 0
    a, b = anchors.float(), bank.float().to(anchors.device)
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
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


def expert_contrastive_loss(outputs: torch.Tensor, top_idx: torch.Tensor, top_gates: torch.Tensor,
                            temperature: float) -> tuple[torch.Tensor, int]:
    """Expert contrast in the layer's output space (CoMoE-style), per sampled token.

    The anchor is the token's routed output ``y = sum_{j<k} g_j o_{e_j}`` (it carries the
    router's gradient through the gates); the chosen experts' outputs ``o_e`` are the positives
    and the other experts' outputs, on the same token, the negatives, by cosine similarity:

        L = -1/k sum_{e in topk} log( exp(cos(y, o_e)/t) / sum_{f=1..E} exp(cos(y, o_f)/t) )

    Minimised when the experts a token does not use produce outputs unlike the ones it uses, so
    experts become distinct on the tokens they serve. docs/method.md has the gradient path.

    Args:
        outputs: (n, E, out) every expert's output on n tokens. top_idx, top_gates: (n, k).
    Returns the mean over tokens and the number of tokens.
    """
    n, E, _ = outputs.shape
    if n == 0 or top_idx.shape[1] == E:  # no token, or no unchosen expert to contrast with
        return outputs.sum() * 0.0, 0
    outputs = outputs.float()
    chosen = outputs.gather(1, top_idx.unsqueeze(-1).expand(-1, -1, outputs.shape[-1]))
    anchor = (top_gates.float().unsqueeze(-1) * chosen).sum(1)  # (n, out)
    sims = torch.einsum("no,neo->ne", F.normalize(anchor, dim=-1),
                        F.normalize(outputs, dim=-1)) / temperature  # (n, E)
    log_prob = sims - torch.logsumexp(sims, dim=1, keepdim=True)
    return -log_prob.gather(1, top_idx).mean(), n


def expert_output_similarity(outputs: torch.Tensor) -> torch.Tensor:
    """Mean pairwise cosine between different experts' outputs on the same token (n, E, out):
    1 when every expert does the same thing, about 0 when they are unrelated. The measure the
    expert contrast is judged by."""
    E = outputs.shape[1]
    if E < 2:
        return outputs.new_zeros(())
    u = F.normalize(outputs.float(), dim=-1)
    gram = u @ u.transpose(1, 2)  # (n, E, E)
    off = ~torch.eye(E, dtype=torch.bool, device=u.device)
    return gram[:, off].mean()


def record_routing_repr(probs: list[torch.Tensor], record_ids: torch.Tensor, num_records: int
                        ) -> torch.Tensor:
    """(R, L*E) routing representation of each record: the mean router probabilities over the
    record's own tokens in each of the L routing layers, concatenated and scaled by 1/sqrt(L),
    so the dot product of two records is their mean over layers of ``p.q``.

    Per record, not per row: the records packed into one row keep their own representations.
    ``p.q`` (not the cosine) is the similarity: it is largest when both records put their
    probability on the same experts, so raising it sharpens the top-k choice, where the cosine
    of centred means can fall while no token changes its experts.

    Args:
        probs: L tensors (T, E), T flattened tokens. record_ids: (T,) or (B, S), index of each
            token's record in ``[0, num_records)``, -1 for padding.
    """
    ids = record_ids.reshape(-1).to(probs[0].device)
    keep = ids >= 0
    ids_k = ids[keep]
    counts = torch.bincount(ids_k, minlength=num_records).clamp_min(1).unsqueeze(-1)
    out = []
    for p in probs:
        sums = p.new_zeros(num_records, p.shape[1]).index_add(0, ids_k, p[keep].float())
        out.append(sums / counts)
    return torch.cat(out, dim=-1) / len(probs) ** 0.5


def label_contrastive_loss(record_repr: torch.Tensor, record_labels: torch.Tensor,
                           queue_vecs: torch.Tensor, queue_labels: torch.Tensor,
                           temperature: float) -> tuple[torch.Tensor, int]:
    """Label-supervised router contrast (SupCon with a MoCo-style memory queue), per record.

    Records sharing ``meta.label`` pull their routing representations (``record_routing_repr``)
    together, by dot product. The bank is the other records of the batch (detached) plus the
    queue of records from past steps.

    Args:
        record_repr: (R, d). record_labels: (R,), -1 = unlabelled.
        queue_vecs: (m, d). queue_labels: (m,).
    """
    R = record_repr.shape[0]
    bank = torch.cat([record_repr.detach().float(), queue_vecs.float().to(record_repr.device)])
    bank_labels = torch.cat([record_labels, queue_labels.to(record_labels.device)])
    exclude = torch.zeros(R, bank.shape[0], dtype=torch.bool, device=record_repr.device)
    exclude[:, :R] = torch.eye(R, dtype=torch.bool, device=record_repr.device)
    return supcon_loss(record_repr, record_labels, bank, bank_labels, temperature, exclude,
                       normalize=False)
