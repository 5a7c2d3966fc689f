"""Routing telemetry against counts worked out by hand."""

from __future__ import annotations

import logging

import pytest
import torch

from sparsedoc.moe.telemetry import RoutingStats


def _identity_reduce(values):
    return values


@pytest.mark.parametrize("stacked", [False, True], ids=["per-layer", "stacked"])
def test_busiest_share_layers_over_threshold_and_collapse_warning(caplog, stacked):
    stats = RoutingStats(["model.layers.0.mlp", "model.layers.1.mlp"], 4, [0, 1],
                         collapse_threshold=0.9, collapse_patience=2)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])  # 5 real tokens, one padding
    probs = torch.full((6, 4), 0.25)
    balanced = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3], [0, 2], [3, 3]])
    collapsed = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1], [0, 2], [1, 1]])
    for step in range(2):
        if stacked:  # both layers in one call, as training adds them
            stats.add(slice(None), torch.stack([balanced, collapsed]),
                      torch.stack([probs, probs]), mask)
        else:
            stats.add(0, balanced, probs, mask)
            stats.add(1, collapsed, probs, mask)
        with caplog.at_level(logging.WARNING, logger="sparsedoc"):
            m = stats.flush(_identity_reduce)
    # layer 0: expert 0 and 2 are in 3 of 5 tokens' top-2; layer 1: expert 0 in all 5
    assert m["moe/busiest_expert_share"] == pytest.approx(1.0)
    assert m["moe/busiest_expert_share_mean"] == pytest.approx((3 / 5 + 1.0) / 2)
    assert m["moe/layers_over_threshold"] == 1.0
    assert m["moe/routing_entropy"] == pytest.approx(float(torch.log(torch.tensor(4.0))))
    assert [m[f"moe/load/layer00/expert{e}"] for e in range(4)] == pytest.approx(
        [3 / 10, 2 / 10, 3 / 10, 2 / 10])  # padding's assignment [3, 3] is not counted
    assert m["moe/collapse"] == 1.0  # two logged steps in a row above 0.9
    assert "model.layers.1.mlp" in caplog.text and "100%" in caplog.text
