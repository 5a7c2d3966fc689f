"""Router/contrastive losses against hand-computed values; the memory queue's ring behaviour."""

from __future__ import annotations

import math

import pytest
import torch

from sparsedoc.moe import losses
from sparsedoc.moe.memory_queue import MemoryQueue


def test_load_balance_hand_computed_with_padding():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    top_idx = torch.tensor([[0], [0], [1]])
    mask = torch.tensor([1, 1, 0])  # third token is padding and must not count
    # f = [1, 0] (both real tokens chose expert 0); P = [(0.7+0.4)/2, (0.3+0.6)/2]
    expect = 2 * (1.0 * 0.55 + 0.0 * 0.45)
    assert losses.load_balance_loss(probs, top_idx, mask).item() == pytest.approx(expect)
    # without the mask the padding token flips the numbers
    f, P = torch.tensor([2 / 3, 1 / 3]), probs.mean(0)
    assert losses.load_balance_loss(probs, top_idx).item() == pytest.approx(2 * float((f * P).sum()))


def test_load_balance_uniform_is_one_and_topk_normalised():
    E, T = 4, 8
    probs = torch.full((T, E), 1 / E)
    top_idx = torch.tensor([[t % E, (t + 1) % E] for t in range(T)])  # top-2, every expert 4x
    assert losses.load_balance_loss(probs, top_idx).item() == pytest.approx(1.0)


def test_z_loss_hand_computed_and_masked():
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0], [50.0, 0.0]])
    mask = torch.tensor([[1, 1, 0]])
    expect = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert losses.router_z_loss(logits, mask).item() == pytest.approx(expect, rel=1e-6)


def test_supcon_hand_computed():
    a = torch.tensor([[1.0, 0.0]])
    bank = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])  # the last is normalised to [0, 1]
    loss, n = losses.supcon_loss(a, torch.tensor([0]), bank, torch.tensor([0, 1, 1]), 0.5)
    # logits = [2, 0, 0]; one positive (index 0)
    expect = -math.log(math.exp(2) / (math.exp(2) + 2))
    assert n == 1
    assert loss.item() == pytest.approx(expect, rel=1e-6)


def test_supcon_anchor_without_positive_is_left_out_and_unlabelled_ignored():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    bank = torch.tensor([[1.0, 0.0]])
    loss, n = losses.supcon_loss(a, torch.tensor([0, 1, -1]), bank, torch.tensor([0]), 1.0)
    assert n == 1  # anchor 1 has no positive, anchor 2 is unlabelled
    assert loss.item() == pytest.approx(0.0, abs=1e-7)  # single candidate, which is the positive


def _cos(u, v):
    return float(torch.dot(u, v) / (u.norm() * v.norm()))


def test_token_routing_repr_is_centred_normalised_logits_per_layer():
    l1 = torch.tensor([[2.0, 0.0], [1.0, 1.0 + 1e-3]])
    l2 = torch.tensor([[0.0, 3.0], [5.0, 1.0]])
    got = losses.token_routing_repr([l1, l2])
    r = 1 / math.sqrt(2)
    # centred [1, -1] -> [r, -r]; centred [-1.5, 1.5] -> [-r, r]; token 1 alike
    expect = torch.tensor([[r, -r, -r, r], [-r, r, r, -r]]) / math.sqrt(2)
    torch.testing.assert_close(got, expect, atol=1e-4, rtol=0)
    assert torch.allclose(got.norm(dim=-1), torch.ones(2))


def test_record_means_average_each_records_own_tokens():
    """Two records packed in one row and one in the next keep separate means."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.3, 0.7]])
    record_ids = torch.tensor([[0, 0, 1], [2, 2, -1]])  # token 5 is padding
    got = losses.record_means(x, record_ids, 3)
    expect = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.55, 0.45]])
    torch.testing.assert_close(got, expect)


def _label_contrast_reference(tokens, record_ids, labels, queue, qlab, t):
    """Per token, with plain loops: the bank is every record's mean token (own record left
    out) and the queue; positives share the token's label; cosine similarity."""
    ids = record_ids.reshape(-1).tolist()
    R = len(labels)
    protos = [sum(tokens[i] for i in range(len(ids)) if ids[i] == r) / ids.count(r) for r in range(R)]
    total, count = 0.0, 0
    for i, r in enumerate(ids):
        if r < 0 or labels[r] < 0:
            continue
        bank = [(protos[b], int(labels[b])) for b in range(R) if b != r] + \
            [(q, int(lab)) for q, lab in zip(queue, qlab)]
        pos = [v for v, lab in bank if lab == int(labels[r])]
        if not pos:
            continue
        denom = sum(math.exp(_cos(tokens[i], v) / t) for v, _ in bank)
        total += -sum(math.log(math.exp(_cos(tokens[i], v) / t) / denom) for v in pos) / len(pos)
        count += 1
    return total / count, count


def test_label_contrast_per_token_matches_a_loop_reference():
    torch.manual_seed(0)
    tokens = torch.randn(8, 6, requires_grad=True)
    record_ids = torch.tensor([[0, 0, 1, 1], [2, 2, 3, -1]])  # two records packed per row
    labels = torch.tensor([0, 1, 0, -1])  # record 3 unlabelled: its token is no anchor
    queue, qlab = torch.randn(3, 6), torch.tensor([1, 0, 1])
    loss, protos, n = losses.label_contrastive_loss(tokens, record_ids, labels, queue, qlab, 0.5)
    expect, count = _label_contrast_reference(tokens.detach(), record_ids, labels, queue, qlab, 0.5)
    assert n == count == 6
    assert loss.item() == pytest.approx(expect, rel=1e-5)
    torch.testing.assert_close(protos, losses.record_means(tokens.detach(), record_ids, 4))
    loss.backward()
    assert tokens.grad[:6].abs().sum(-1).gt(0).all()  # every labelled token gets a gradient
    assert tokens.grad[6].abs().sum() == 0  # the unlabelled record's token gets none


def _expert_contrast_reference(outputs, top_idx, gates, t):
    n, E, _ = outputs.shape
    num = den = 0.0
    for x in range(n):
        for j in range(top_idx.shape[1]):
            e = int(top_idx[x, j])
            a = outputs[x, e]
            others = [(x2, f) for x2 in range(n) for f in range(E) if (x2, f) != (x, e)]
            denom = sum(math.exp(_cos(a, outputs[x2, f]) / t) for x2, f in others)
            pos = [x2 for x2 in range(n) if x2 != x]
            l = -sum(math.log(math.exp(_cos(a, outputs[x2, e]) / t) / denom) for x2 in pos) / len(pos)
            num += float(gates[x, j]) * l
            den += float(gates[x, j])
    return num / den


def test_expert_contrast_matches_a_per_anchor_reference():
    torch.manual_seed(0)
    outputs = torch.randn(5, 4, 6)
    top_idx = torch.tensor([[0, 2], [1, 3], [3, 0], [2, 1], [0, 1]])
    gates = torch.rand(5, 2).softmax(-1)
    loss, n = losses.expert_contrastive_loss(outputs, top_idx, gates, temperature=0.3)
    assert n == 10
    assert loss.item() == pytest.approx(_expert_contrast_reference(outputs, top_idx, gates, 0.3),
                                        rel=1e-5)


def test_expert_contrast_falls_as_experts_become_distinct():
    """Loss is lower when each expert keeps one direction of its own across tokens than when
    every expert does the same thing; the gates get a gradient; zero outputs are left out."""
    torch.manual_seed(0)
    top_idx = torch.tensor([[0, 1], [1, 2], [2, 0]])
    gates = torch.full((3, 2), 0.5, requires_grad=True)
    own = torch.eye(3).unsqueeze(0).repeat(3, 1, 1) + 0.05 * torch.randn(3, 3, 3)
    same = torch.ones(3, 3, 3) + 0.05 * torch.randn(3, 3, 3)
    low, _ = losses.expert_contrastive_loss(own, top_idx, gates, 0.1)
    high, _ = losses.expert_contrastive_loss(same, top_idx, gates, 0.1)
    assert low < high
    high.backward()
    assert gates.grad.abs().sum() > 0
    loss, n = losses.expert_contrastive_loss(torch.zeros(3, 3, 3), top_idx, gates, 0.1)
    assert n == 0 and loss.item() == 0.0


def test_expert_output_similarity_hand_computed():
    o = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])  # cosines 0, 1/sqrt2, 1/sqrt2
    expect = (0 + 2 / math.sqrt(2)) / 3
    assert losses.expert_output_similarity(o).item() == pytest.approx(expect, rel=1e-6)
    same = torch.ones(2, 3, 4)
    assert losses.expert_output_similarity(same).item() == pytest.approx(1.0)


# ---- memory queue -----------------------------------------------------------------------------


def test_queue_fifo_wraparound_and_bound():
    q = MemoryQueue(groups=2, size=4, dim=2)
    vecs = torch.tensor([[float(i), 1.0] for i in range(1, 7)])
    q.enqueue(0, vecs[:3])
    got, _ = q.get(0)
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, vecs[:3])  # stored as given, not normalised
    q.enqueue(0, vecs[3:6])  # 6 in total, ring of 4: the two oldest are overwritten
    got, _ = q.get(0)
    torch.testing.assert_close(got, vecs[2:6])
    assert int(q.count[0]) == 4 and int(q.ptr[0]) == 2
    assert q.get(1)[0].shape == (0, 2)  # other ring untouched
    assert q.vectors.shape == (2, 4, 2)  # bounded by construction


def test_queue_enqueue_more_than_size_keeps_newest_and_labels():
    q = MemoryQueue(groups=1, size=3, dim=2)
    vecs = torch.randn(5, 2)
    q.enqueue(0, vecs, torch.tensor([10, 11, 12, 13, 14]))
    got, labels = q.get(0)
    torch.testing.assert_close(got, vecs[2:])
    assert labels.tolist() == [12, 13, 14]


def test_queue_state_round_trips_through_state_dict(tmp_path):
    q = MemoryQueue(groups=3, size=5, dim=4)
    for g in range(3):
        q.enqueue(g, torch.randn(g + 4, 4), torch.arange(g + 4))
    torch.save(q.state_dict(), tmp_path / "q.pt")
    q2 = MemoryQueue(groups=3, size=5, dim=4)
    q2.load_state_dict(torch.load(tmp_path / "q.pt"))
    for g in range(3):
        assert torch.equal(q.get(g)[0], q2.get(g)[0])
        assert torch.equal(q.get(g)[1], q2.get(g)[1])
    assert set(q.state_dict()) == {"vectors", "labels", "ptr", "count"}


def test_queue_rejects_wrong_dim():
    with pytest.raises(ValueError, match="dim is 4"):
        MemoryQueue(1, 2, 4).enqueue(0, torch.randn(1, 3))


def _mi_bits_reference(p_given, share):
    """I(label; expert) in nats from per-label expert distributions, by explicit sums."""
    E = len(p_given[0])
    marg = [sum(share[c] * p_given[c][e] for c in range(len(share))) for e in range(E)]
    h = -sum(m * math.log(m) for m in marg if m > 0)
    h_cond = -sum(share[c] * sum(q * math.log(q) for q in p_given[c] if q > 0)
                  for c in range(len(share)))
    return h - h_cond


def test_label_mi_loss_matches_a_loop_reference_over_batch_and_queue():
    torch.manual_seed(0)
    L, E = 2, 3
    logits = [torch.randn(8, E, requires_grad=True) for _ in range(L)]
    probs = [z.softmax(-1) for z in logits]
    record_ids = torch.tensor([[0, 0, 1, 1], [2, 2, 3, -1]])  # packed rows, one padding token
    labels = torch.tensor([0, 1, 0, -1])  # record 3 unlabelled: not in the estimate
    queue = torch.rand(3, L * E)
    queue = (queue.view(3, L, E) / queue.view(3, L, E).sum(-1, keepdim=True)).view(3, L * E)
    qlab = torch.tensor([1, 2, 1])
    loss, protos, n = losses.label_routing_mi_loss(probs, record_ids, labels, queue, qlab)
    assert n == 3
    # reference: prototypes by loops, then per-layer MI over the 3 batch + 3 queue records
    ids = record_ids.reshape(-1).tolist()
    recs = {}
    for t, r in enumerate(ids):
        if r >= 0:
            recs.setdefault(r, []).append(t)
    expect = 0.0
    for layer in range(L):
        p = probs[layer].detach()
        bank = [(int(labels[r]), [sum(float(p[t, e]) for t in toks) / len(toks) for e in range(E)])
                for r, toks in sorted(recs.items()) if labels[r] >= 0]
        bank += [(int(qlab[i]), queue[i].view(L, E)[layer].tolist()) for i in range(3)]
        classes = sorted({c for c, _ in bank})
        share = [sum(1 for c2, _ in bank if c2 == c) / len(bank) for c in classes]
        p_given = [[sum(v[e] for c2, v in bank if c2 == c) / sum(1 for c2, _ in bank if c2 == c)
                    for e in range(E)] for c in classes]
        expect += _mi_bits_reference(p_given, share) / L
    assert loss.item() == pytest.approx(1 - expect / math.log(E), rel=1e-5)
    torch.testing.assert_close(protos[:3].view(3, L, E)[:, 0], torch.stack(
        [probs[0][torch.tensor(recs[r])].mean(0) for r in range(3)]).detach())
    loss.backward()
    assert all(z.grad[:6].abs().sum(-1).gt(0).all() for z in logits)  # labelled tokens
    assert all(z.grad[6:].abs().sum() == 0 for z in logits)  # unlabelled record, padding


def test_label_mi_loss_is_zero_for_a_perfect_map_and_one_for_label_blind_routing():
    E = 2
    record_ids = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    labels = torch.tensor([0, 1, 0, 1])
    perfect = torch.eye(E)[labels[record_ids]]  # every token of label c on expert c
    loss, _, _ = losses.label_routing_mi_loss([perfect], record_ids, labels,
                                              torch.zeros(0, E), torch.zeros(0, dtype=torch.long))
    assert loss.item() == pytest.approx(0.0, abs=1e-6)  # I = H(label) = log 2 = log E
    blind = torch.tensor([[0.7, 0.3]]).repeat(8, 1)  # the same routing whatever the label
    loss, _, _ = losses.label_routing_mi_loss([blind], record_ids, labels,
                                              torch.zeros(0, E), torch.zeros(0, dtype=torch.long))
    assert loss.item() == pytest.approx(1.0, abs=1e-6)


def test_label_mi_gradient_is_the_exact_information_gradient_scaled_to_the_batch():
    """The surrogate's gradient equals autograd through a loop-built ``1 - I / log E`` times
    N / n (records in the estimate over labelled batch records), so the queue does not dilute it."""
    torch.manual_seed(1)
    L, E = 2, 3
    logits = [torch.randn(10, E, requires_grad=True) for _ in range(L)]
    record_ids = torch.tensor([0, 0, 0, 1, 1, 2, 2, 3, 3, 3])
    labels = torch.tensor([0, 1, 1, 0])
    queue = torch.rand(5, L, E)
    queue = (queue / queue.sum(-1, keepdim=True)).view(5, L * E)
    qlab = torch.tensor([0, 1, 2, 2, 0])
    loss, _, n = losses.label_routing_mi_loss([z.softmax(-1) for z in logits], record_ids,
                                              labels, queue, qlab)
    ours = torch.autograd.grad(loss, logits)

    ref = 0.0
    for layer in range(L):
        p = logits[layer].softmax(-1)
        bank = [(int(labels[r]), torch.stack([p[t] for t in range(10) if record_ids[t] == r]).mean(0))
                for r in range(4)]
        bank += [(int(qlab[i]), queue[i].view(L, E)[layer]) for i in range(5)]
        N = len(bank)
        marg = sum(v for _, v in bank) / N
        info = -(marg * marg.log()).sum()
        for c in {c for c, _ in bank}:
            members = [v for c2, v in bank if c2 == c]
            given = sum(members) / len(members)
            info = info + len(members) / N * (given * given.log()).sum()
        ref = ref + info / L
    ref_loss = 1 - ref / math.log(E)
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    theirs = torch.autograd.grad(ref_loss, logits)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b * (N / n), rtol=1e-4, atol=1e-7)


def test_stacked_routers_give_each_router_its_own_hand_computed_losses():
    """L routers stacked (L, T, E): one balance and one z loss per router, each equal to what
    the router's own numbers give by hand."""
    probs = torch.tensor([[[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]],
                          [[0.5, 0.5], [0.2, 0.8], [0.6, 0.4]]])
    top_idx = torch.tensor([[[0], [0], [1]], [[1], [1], [0]]])
    mask = torch.tensor([1, 1, 0])
    # router 0 as in the unstacked test; router 1: f = [0, 1], P = [0.35, 0.65]
    balance = losses.load_balance_loss(probs, top_idx, mask)
    assert balance.tolist() == pytest.approx([2 * 0.55, 2 * 0.65])
    logits = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0], [50.0, 0.0]],
                           [[math.log(3.0), 0.0], [0.0, 0.0], [0.0, 50.0]]])
    z = losses.router_z_loss(logits, mask)
    both = (math.log(2) ** 2 + math.log(4) ** 2) / 2
    assert z.tolist() == pytest.approx([both, both], rel=1e-6)


def test_token_routing_repr_of_a_stack_equals_that_of_the_list():
    l1 = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.5, -1.0]])
    l2 = torch.tensor([[0.0, 3.0, 0.5], [5.0, 1.0, 2.0]])
    r = 1 / math.sqrt(2)
    got = losses.token_routing_repr(torch.stack([l1, l2]))
    # token 0, layer 0: centred [1, -1, 0] -> [r, -r, 0]
    torch.testing.assert_close(got[0, :3], torch.tensor([r, -r, 0.0]) * r, atol=1e-6, rtol=0)
    torch.testing.assert_close(got, losses.token_routing_repr([l1, l2]))
