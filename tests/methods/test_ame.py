"""AME: planted-effect recovery with c·k·log n submodels, Shapley weighting, end to end."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from headwater.methods.ame import (
    AME_C,
    AMEResult,
    ame,
    ame_design,
    ame_estimate,
    ame_features,
    ame_num_models,
)
from headwater.task import ClassificationTask
from headwater.train.ensemble import TrainConfig


@pytest.mark.parametrize("distribution", ["grid", "shapley"])
def test_recovers_planted_high_impact_examples(distribution):
    n, k = 200, 5
    n_models = ame_num_models(n, k)
    assert n_models <= AME_C * k * math.log(n) + 1
    g = torch.Generator().manual_seed(1)
    planted = torch.randperm(n, generator=g)[:k]
    effect = 0.01 * torch.randn(n, generator=g, dtype=torch.float64)
    effect[planted] = torch.tensor([1.0, -1.0, 0.8, -0.7, 0.6], dtype=torch.float64)
    masks, p = ame_design(n, n_models, distribution=distribution, seed=0)
    outcomes = masks.double() @ effect + 0.1 * torch.randn(
        n_models, generator=g, dtype=torch.float64
    )
    values, _ = ame_estimate(masks, p, outcomes)
    result = AMEResult(values, -n * values, masks, p, outcomes[:, None], torch.zeros(1))
    found = set(result.support(0, threshold=0.3).tolist())  # half the smallest planted effect
    truth = set(planted.tolist())
    precision = len(found & truth) / max(len(found), 1)
    recall = len(found & truth) / k
    assert precision >= 0.9 and recall >= 0.9, (precision, recall)
    # estimates are the effects of including (sign) and the scores follow DESIGN.md
    assert (torch.sign(values[0, planted]) == torch.sign(effect[planted])).all()
    torch.testing.assert_close(result.scores, -n * values)


def test_features_are_centred_and_scaled():
    masks, p = ame_design(50, 4000, seed=3)
    x = ame_features(masks, p)
    v = (1 / (p * (1 - p))).mean()
    assert x.mean().abs() < 0.01
    assert abs((x.pow(2).mean() * v) - 1) < 0.02  # E[X²] = v before dividing by v
    assert set(p.unique().tolist()) <= {0.2, 0.4, 0.6, 0.8}
    _, ps = ame_design(50, 1000, distribution="shapley", seed=3)
    assert 0.05 <= ps.min() and ps.max() <= 0.95


def test_end_to_end_on_a_tiny_model():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(30, 3, generator=g, dtype=torch.float64)
    y = (x[:, 0] > 0).long()
    model = nn.Linear(3, 2).double()
    task = ClassificationTask(weight_decay=0.1, measurement="margin")
    cfg = TrainConfig(optimizer="lbfgs", init="copy", tol=1e-8)
    result = ame(model, task, (x, y), (x[:2], y[:2]), n_models=24, config=cfg)
    assert result.ame.shape == (2, 30) and result.outcomes.shape == (24, 2)
    assert torch.isfinite(result.ame).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="k"):
        ame_num_models(100, 0)
    with pytest.raises(ValueError, match="distribution"):
        ame_design(10, 5, distribution="beta")
    with pytest.raises(ValueError, match="grid"):
        ame_design(10, 5, grid=(0.0, 0.5))
