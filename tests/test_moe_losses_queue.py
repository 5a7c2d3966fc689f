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


def test_label_contrast_excludes_self_and_uses_batch_and_queue():
    """Records' routing representations are compared by plain dot product (not cosine)."""
    seq = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.2, 0.8]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    queue = torch.tensor([[0.3, 0.7]])
    qlab = torch.tensor([1])
    loss, n = losses.label_contrastive_loss(seq, labels, queue, qlab, temperature=0.5)
    bank = torch.cat([seq.detach(), queue]).tolist()
    s = lambda i, j: sum(a * b for a, b in zip(bank[i], bank[j])) / 0.5
    # anchor 0: candidates rows 1, 2 and the queue entry (itself excluded); positive row 1
    l0 = -math.log(math.exp(s(0, 1)) / (math.exp(s(0, 1)) + math.exp(s(0, 2)) + math.exp(s(0, 3))))
    l1 = -math.log(math.exp(s(1, 0)) / (math.exp(s(1, 0)) + math.exp(s(1, 2)) + math.exp(s(1, 3))))
    l2 = -math.log(math.exp(s(2, 3)) / (math.exp(s(2, 0)) + math.exp(s(2, 1)) + math.exp(s(2, 3))))
    assert n == 3
    assert loss.item() == pytest.approx((l0 + l1 + l2) / 3, rel=1e-5)
    loss.backward()
    assert seq.grad.abs().sum() > 0


def test_record_routing_repr_is_the_mean_over_each_records_own_tokens():
    """Two records packed in one row and one in the next keep separate representations."""
    p1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.2, 0.8], [0.9, 0.1], [0.3, 0.7]])
    p2 = torch.tensor([[0.4, 0.6], [0.6, 0.4], [1.0, 0.0], [0.0, 1.0], [0.7, 0.3], [0.5, 0.5]])
    record_ids = torch.tensor([[0, 0, 1], [2, 2, -1]])  # token 5 is padding
    got = losses.record_routing_repr([p1, p2], record_ids, 3)
    expect = torch.tensor([
        [0.5, 0.5, 0.5, 0.5],  # record 0: tokens 0, 1
        [0.5, 0.5, 1.0, 0.0],  # record 1: token 2
        [0.55, 0.45, 0.35, 0.65],  # record 2: tokens 3, 4 (not the padding token 5)
    ]) / math.sqrt(2)
    torch.testing.assert_close(got, expect)


def _expert_contrast_reference(outputs, top_idx, gates, t):
    total = 0.0
    for i in range(outputs.shape[0]):
        y = sum(float(gates[i, j]) * outputs[i, int(top_idx[i, j])] for j in range(top_idx.shape[1]))
        cos = [float(torch.dot(y, o) / (y.norm() * o.norm())) for o in outputs[i]]
        denom = sum(math.exp(c / t) for c in cos)
        total += -sum(math.log(math.exp(cos[int(e)] / t) / denom) for e in top_idx[i]) / top_idx.shape[1]
    return total / outputs.shape[0]


def test_expert_contrast_matches_a_per_token_reference():
    torch.manual_seed(0)
    outputs = torch.randn(5, 4, 6)
    top_idx = torch.tensor([[0, 2], [1, 3], [3, 0], [2, 1], [0, 1]])
    gates = torch.rand(5, 2).softmax(-1)
    loss, n = losses.expert_contrastive_loss(outputs, top_idx, gates, temperature=0.3)
    assert n == 5
    assert loss.item() == pytest.approx(_expert_contrast_reference(outputs, top_idx, gates, 0.3),
                                        rel=1e-5)


def test_expert_contrast_falls_as_unused_experts_diverge():
    """Same chosen outputs; the loss is lower when the unchosen experts point elsewhere."""
    chosen = torch.tensor([[1.0, 0.0, 0.0]])
    top_idx, gates = torch.tensor([[0]]), torch.tensor([[0.8]])
    alike = torch.stack([chosen[0], torch.tensor([0.9, 0.1, 0.0]), torch.tensor([0.8, 0.2, 0.0])])
    unlike = torch.stack([chosen[0], torch.tensor([-1.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])])
    high, _ = losses.expert_contrastive_loss(alike[None], top_idx, gates, 0.1)
    low, _ = losses.expert_contrastive_loss(unlike[None], top_idx, gates, 0.1)
    assert low < high


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
