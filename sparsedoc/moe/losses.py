"""Router and expert losses: pure functions of tensors and masks (no model, no state).

Formulas, with the reasoning, are in ``docs/method.md``. Masks are 1 for real tokens and 0 for
padding; padded tokens never count.
"""

from __future__ import annotations

import math

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
        probs: (T, E) router softmax, or (L, T, E): L routers stacked, one loss each (one set
            of kernels for every router of the model instead of one per router).
        top_idx: (T, k) or (L, T, k) chosen experts. mask: (T,) or (B, S).
    """
    T, E = probs.shape[-2:]
    k = top_idx.shape[-1]
    lead = top_idx.shape[:-2]
    m = _flat_mask(mask, T, probs.device)
    denom = m.sum().clamp_min(1.0)
    assign = torch.zeros(*lead, E, device=probs.device)  # assignments per expert, real tokens
    assign.scatter_add_(-1, top_idx.reshape(*lead, T * k),
                        m.repeat_interleave(k).expand(*lead, T * k).contiguous())
    f = assign / (denom * k)
    P = (m @ probs.float()) / denom  # (..., E)
    return E * (f * P).sum(-1)


def router_z_loss(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE z-loss: mean of logsumexp(logits)^2 over real tokens; keeps logits small.
    ``logits`` (T, E), or (L, T, E) for one loss per stacked router."""
    m = _flat_mask(mask, logits.shape[-2], logits.device)
    z = torch.logsumexp(logits.float(), dim=-1) ** 2
    return (z @ m) / m.sum().clamp_min(1.0)


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
    """Expert-identity contrast in the layer's output space, over n sampled tokens.

    Every expert's output ``o_e(x) = s B_e A_e x`` on every sampled token is in the bank. Each
    chosen expert's output is an anchor; its positives are the same expert's outputs on the
    other sampled tokens, its negatives every other expert's outputs (on the same token too),
    by cosine similarity:

        l(x, e) = -1/(n-1) sum_{x' != x} log( exp(c(o_e(x), o_e(x'))/t)
                                            / sum_{(x'', f) != (x, e)} exp(c(o_e(x), o_f(x''))/t) )
        L = sum_{x, e in topk(x)} g_e(x) l(x, e) / sum g

    Minimised when each expert's outputs share a direction of their own, unlike every other
    expert's, so on any token the experts differ. The gate weights carry the gradient to the
    router (it moves gate mass to the experts whose output on x is most their own); the
    outputs carry it to every expert's A and B. Zero outputs (B = 0 at the start) take no
    part: their direction is undefined. docs/method.md has the cost.

    Args:
        outputs: (n, E, out) every expert's output on n tokens. top_idx, top_gates: (n, k).
    Returns the loss and the number of anchors used.
    """
    n, E, d = outputs.shape
    if n < 2:  # no positive: the same expert on another token
        return outputs.sum() * 0.0, 0
    flat = outputs.float().reshape(n * E, d)
    norms = flat.norm(dim=-1)
    alive = norms.detach() > 0
    unit = flat / norms.clamp_min(torch.finfo(flat.dtype).tiny).unsqueeze(-1)
    expert_of = torch.arange(E, device=flat.device).repeat(n)
    token_of = torch.arange(n, device=flat.device).repeat_interleave(E)
    anchor = (torch.arange(n, device=flat.device).unsqueeze(1) * E + top_idx).reshape(-1)
    weight = top_gates.float().reshape(-1)
    keep = alive[anchor]
    anchor, weight = anchor[keep], weight[keep]
    if anchor.numel() == 0:
        return outputs.sum() * 0.0, 0
    sims = unit[anchor] @ unit.t() / temperature  # (a, nE)
    self_or_dead = (torch.arange(n * E, device=flat.device)[None, :] == anchor[:, None]) | ~alive[None, :]
    sims = sims.masked_fill(self_or_dead, float("-inf"))
    pos = (expert_of[None, :] == expert_of[anchor][:, None]) & \
        (token_of[None, :] != token_of[anchor][:, None]) & ~self_or_dead
    n_pos = pos.sum(1)
    has_pos = n_pos > 0
    if not has_pos.any():
        return outputs.sum() * 0.0, 0
    log_prob = sims - torch.logsumexp(sims, dim=1, keepdim=True)
    per_anchor = -log_prob.masked_fill(~pos, 0.0).sum(1)[has_pos] / n_pos[has_pos]
    w = weight[has_pos]
    return (w * per_anchor).sum() / w.detach().sum().clamp_min(1e-12), int(has_pos.sum())


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


def token_routing_repr(logits: list[torch.Tensor] | torch.Tensor) -> torch.Tensor:
    """(T, L*E) routing representation of each token: in each of the L routing layers the
    router's logits, centred and L2-normalised, concatenated and scaled by 1/sqrt(L), so the
    dot product of two tokens is their mean over layers of the cosine of their centred logits.

    Centred logits are what decides the top-k (softmax ignores a shared shift): a token whose
    centred logits point where its label's point picks its label's experts. Probabilities near
    uniform (early training) would give near-equal similarities and no gradient; directions
    do not.

    Args:
        logits: L tensors (T, E), T flattened tokens, or one (L, T, E) stack of them.
    """
    z = (torch.stack(list(logits)) if isinstance(logits, (list, tuple)) else logits).float()
    L, T, E = z.shape
    z = F.normalize(z - z.mean(dim=-1, keepdim=True), dim=-1)  # (L, T, E)
    return z.transpose(0, 1).reshape(T, L * E) / L ** 0.5


def record_means(token_repr: torch.Tensor, record_ids: torch.Tensor, num_records: int
                 ) -> torch.Tensor:
    """(R, d) mean of each record's token representations, over the record's own tokens.

    Per record, not per row: the records packed into one row keep their own means.

    Args:
        token_repr: (T, d). record_ids: (T,) or (B, S), index of each token's record in
            ``[0, num_records)``, -1 for padding.
    """
    ids = record_ids.reshape(-1).to(token_repr.device)
    keep = ids >= 0
    ids_k = ids[keep]
    counts = torch.bincount(ids_k, minlength=num_records).clamp_min(1).unsqueeze(-1)
    sums = token_repr.new_zeros(num_records, token_repr.shape[1]).index_add(0, ids_k, token_repr[keep])
    return sums / counts


def label_contrastive_loss(token_repr: torch.Tensor, record_ids: torch.Tensor,
                           record_labels: torch.Tensor, queue_vecs: torch.Tensor,
                           queue_labels: torch.Tensor, temperature: float
                           ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Label-supervised router contrast (SupCon with a MoCo-style memory queue), per token.

    Each labelled token is an anchor. The bank holds record prototypes (``record_means`` of
    the token representations, detached): the batch's other records and the queue of past
    records. Prototypes of the token's label are its positives, the rest its negatives, by
    cosine. The token's own record is left out, so the positives are other records of its
    label. Every token's top-k is pulled toward its label's experts.

    Args:
        token_repr: (T, d) with gradient. record_ids: (T,) or (B, S), -1 = padding.
        record_labels: (R,), -1 = unlabelled. queue_vecs: (m, d). queue_labels: (m,).
    Returns the loss, the batch's (R, d) prototypes (detached, for the queue) and the number
    of anchors used.
    """
    R = record_labels.shape[0]
    ids = record_ids.reshape(-1).to(token_repr.device)
    record_labels = record_labels.to(token_repr.device)
    protos = record_means(token_repr.detach(), ids, R)
    tok = (ids >= 0).nonzero().squeeze(-1)
    tok = tok[record_labels[ids[tok]] >= 0]
    anchors, own = token_repr[tok], ids[tok]
    bank = torch.cat([protos, queue_vecs.float().to(protos.device)])
    bank_labels = torch.cat([record_labels, queue_labels.to(record_labels.device)])
    exclude = torch.zeros(len(tok), bank.shape[0], dtype=torch.bool, device=protos.device)
    exclude[torch.arange(len(tok), device=protos.device), own] = True
    loss, n = supcon_loss(anchors, record_labels[own], bank, bank_labels, temperature, exclude)
    return loss, protos, n


def label_routing_mi_loss(probs: list[torch.Tensor], record_ids: torch.Tensor,
                          record_labels: torch.Tensor, queue_vecs: torch.Tensor,
                          queue_labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Label-supervised routing by its information: ``1 - I(label; expert) / log E``, per layer.

    ``I = H(E) - sum_l pi_l H(E | l)`` of the soft routing, from record prototypes (a
    record's mean routing probabilities over its own tokens): the batch's labelled records,
    with gradient, and the memory queue's past records, detached, so the label-conditional
    distributions are estimated over many steps, not over the few records of one batch.
    Raising ``I`` concentrates each label's tokens on its own experts (a mean of probabilities
    is peaked only when its tokens are) and spreads labels over different ones, which is what
    the held-out top-1 metric measures; the InfoNCE label contrast only aligns logit
    directions and did not move top-1 (docs/method.md). The ablation's routing ceiling
    maximises the same quantity for a router fitted on frozen features.

    Args:
        probs: L tensors (T, E) of routing probabilities, with gradient; the method passes
            ``softmax(logits / temperature)``: near-uniform routing is a saddle of ``I`` (no
            gradient), and as the temperature falls ``I`` tends to the top-1's information.
        record_ids: (T,) or (B, S), -1 = padding. record_labels: (R,), -1 = unlabelled.
        queue_vecs: (m, L*E) past prototypes. queue_labels: (m,).
    Returns the loss (its value: mean over layers, 0 when routing is a perfect function of the
    label and E = number of labels; its gradient: that of the value scaled by N / n, the records
    in the estimate over those in the batch, see below), the batch's (R, L*E) prototypes (detached, for the queue) and
    the number of labelled records in the batch.
    """
    L, E = len(probs), probs[0].shape[-1]
    flat = torch.cat([p.float() for p in probs], dim=-1)  # (T, L*E)
    R = record_labels.shape[0]
    ids = record_ids.reshape(-1).to(flat.device)
    record_labels = record_labels.to(flat.device)
    protos = record_means(flat, ids, R)
    has_tokens = torch.bincount(ids[ids >= 0], minlength=R) > 0
    keep = (record_labels >= 0) & has_tokens
    bank = torch.cat([protos[keep], queue_vecs.float().to(flat.device)])
    labels = torch.cat([record_labels[keep], queue_labels.to(flat.device)])
    n = int(keep.sum())
    if n == 0:
        return flat.sum() * 0.0, protos.detach(), 0
    onehot = F.one_hot(labels, int(labels.max()) + 1).float()  # (N, C)
    count = onehot.sum(0)
    share = count / count.sum()  # pi_l
    given = ((onehot.t() @ bank) / count.clamp_min(1).unsqueeze(-1)).view(-1, L, E)  # (C, L, E)
    marginal = torch.einsum("c,cle->le", share, given)

    def entropy(p: torch.Tensor) -> torch.Tensor:
        return -(p * p.clamp_min(1e-12).log()).sum(-1)

    mi = entropy(marginal) - torch.einsum("c,cl->l", share, entropy(given))  # (L,)
    value = 1.0 - mi.mean() / math.log(E)
    # The gradient of I with respect to one record's prototype is its label's pointwise
    # information, log p(e | l) - log p(e), divided by the N records of the estimate: with the
    # queue's N ~ 260 against a batch's 4, the LM loss drowned it (docs/method.md, (2b)). The
    # surrogate keeps that direction at 1/n per batch record, so the weight does not shrink as
    # the queue grows; the loss's value stays 1 - I / log E.
    pmi = (given.clamp_min(1e-12).log() - marginal.clamp_min(1e-12).log()).detach()  # (C, L, E)
    mine = protos[keep].view(n, L, E)
    surrogate = -(mine * pmi[record_labels[keep]]).sum(-1).mean() / math.log(E)
    return value.detach() + surrogate - surrogate.detach(), protos.detach(), n
