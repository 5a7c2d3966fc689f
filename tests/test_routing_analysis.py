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
    s = specialization_summary(torch.stack([perfect, independent]), ["a", "b"])
    assert s["mi_bits_mean"] == pytest.approx(0.5) and s["label_entropy_bits"] == pytest.approx(1.0)


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
    counts, names = label_expert_counts(model, [batch], num_labels=2)
    assert counts.shape == (len(routing_layers(model)), 2, 4)
    # labelled real tokens: 6 + 4, each assigned to top-2 experts; the unlabelled row is ignored
    assert counts.sum(dim=(1, 2)).tolist() == [20.0] * len(names)
    assert counts[:, 0].sum(-1).tolist() == [12.0] * len(names)
