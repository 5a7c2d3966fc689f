"""Routing analysis: mutual information between label and chosen expert, counts from a model."""

from __future__ import annotations

import math

import pytest
import torch

from sparsedoc.eval.routing import label_expert_counts, mutual_information, specialization_summary


def test_mutual_information_extremes_and_hand_value():
    perfect = torch.tensor([[10.0, 0.0], [0.0, 10.0]])
    independent = torch.tensor([[5.0, 5.0], [5.0, 5.0]])
    assert mutual_information(perfect).item() == pytest.approx(1.0)
    assert mutual_information(independent).item() == pytest.approx(0.0, abs=1e-12)
    # p = [[.4,.1],[.1,.4]]: I = sum p log2(p / (.5*.5))
    t = torch.tensor([[4.0, 1.0], [1.0, 4.0]])
    expect = 2 * 0.4 * math.log2(0.4 / 0.25) + 2 * 0.1 * math.log2(0.1 / 0.25)
    assert mutual_information(t).item() == pytest.approx(expect)
    assigned = torch.tensor([[10.0, 10.0], [10.0, 10.0]])
    s = specialization_summary(torch.stack([perfect, independent]), assigned, ["a", "b"], 1)
    assert s["mi_bits_mean"] == pytest.approx(0.5) and s["label_entropy_bits"] == pytest.approx(1.0)
    assert s["per_layer"]["a"]["mi_fraction"] == pytest.approx(1.0)  # perfect map: I = H(label)
    assert s["per_layer"]["b"]["mi_fraction"] == pytest.approx(0.0, abs=1e-12)


def test_specialization_metrics_on_hand_built_routing():
    """Three labels of unequal size, four experts, top-2: every metric by hand."""
    # layer 0: label -> top-1 expert is a perfect map (labels 0, 1, 2 -> experts 0, 1, 2)
    # layer 1: every label spreads its tokens evenly over experts 0 and 3 (independent)
    tokens = [20.0, 10.0, 10.0]
    l0 = torch.tensor([[20.0, 0, 0, 0], [0, 10.0, 0, 0], [0, 0, 10.0, 0]])
    l1 = torch.tensor([[10.0, 0, 0, 10.0], [5.0, 0, 0, 5.0], [5.0, 0, 0, 5.0]])
    # top-k assignments (40 tokens x 2): layer 0 balanced over 4 experts, layer 1 expert 0 in
    # every token's top-2
    assigned = torch.tensor([[20.0, 20.0, 20.0, 20.0], [40.0, 20.0, 0.0, 20.0]])
    s = specialization_summary(torch.stack([l0, l1]), assigned, ["m.layers.0.q", "m.layers.1.q"],
                               top_k=2)
    p = [t / 40 for t in tokens]
    h = -sum(x * math.log2(x) for x in p)  # 1.5 bits
    assert s["label_entropy_bits"] == pytest.approx(h)
    a, b = s["per_layer"]["m.layers.0.q"], s["per_layer"]["m.layers.1.q"]
    assert a["mi_bits"] == pytest.approx(h) and a["mi_fraction"] == pytest.approx(1.0)
    assert b["mi_bits"] == pytest.approx(0.0, abs=1e-12)
    assert s["mi_fraction_mean"] == pytest.approx(0.5)
    assert a["load_entropy_bits"] == pytest.approx(2.0)  # uniform over 4 experts
    assert b["load_entropy_bits"] == pytest.approx(1.5)  # shares 1/2, 1/4, 0, 1/4
    assert a["busiest_share"] == pytest.approx(0.5)  # = top_k / E when balanced
    assert b["busiest_share"] == pytest.approx(1.0)
    assert s["busiest_share_max"] == pytest.approx(1.0)
    assert s["balanced_busiest_share"] == pytest.approx(0.5)


def test_independent_random_routing_has_mi_near_zero():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 4, (20000,), generator=g)
    experts = torch.randint(0, 4, (20000,), generator=g)
    counts = torch.bincount(labels * 4 + experts, minlength=16).view(4, 4).double()
    assert mutual_information(counts).item() < 0.002


def test_counts_from_model_cover_every_real_token(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sparsedoc.config import MoECfg
    from sparsedoc.moe.inject import inject_lora_moe, routing_layers

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    inject_lora_moe(model, MoECfg(num_experts=4, top_k=2))
    ids = torch.randint(0, 1000, (3, 6))
    mask = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 5 + [0]])
    record_ids = torch.where(mask.bool(), torch.arange(3)[:, None], torch.tensor(-1))
    batch = {"input_ids": ids, "attention_mask": mask, "record_ids": record_ids,
             "record_label_ids": torch.tensor([0, 1, -1])}
    top1, assigned, names = label_expert_counts(model, [batch], num_labels=2)
    assert top1.shape == (len(routing_layers(model)), 2, 4)
    # labelled real tokens: 6 + 4 (the unlabelled row is ignored), one top-1 expert each, and
    # two top-k assignments each
    assert top1.sum(dim=(1, 2)).tolist() == [10.0] * len(names)
    assert top1[:, 0].sum(-1).tolist() == [6.0] * len(names)
    assert assigned.sum(-1).tolist() == [20.0] * len(names)
