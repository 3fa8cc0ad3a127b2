"""Score uncertainty over an ensemble: mean, standard error, stability."""

from __future__ import annotations

import pytest
import torch
from cases import mlp

from headwater.curvature import Exact
from headwater.methods import InfluenceFunction
from headwater.methods.ensemble_scores import ensemble_scores, stability
from headwater.train.ensemble import TrainConfig, train_ensemble


def test_influence_over_retrained_seeds():
    case = mlp(n_train=24, n_query=3)
    ens = train_ensemble(
        case.model,
        case.task,
        case.train,
        torch.ones(4, 24),
        config=TrainConfig(lr=0.05, epochs=20, batch_size=8),
    )

    def score_fn(model):
        return (
            InfluenceFunction(model, case.task, Exact(damping=0.1))
            .fit(case.train)
            .scores(case.query, case.train)
        )

    result = ensemble_scores(score_fn, (case.model, ens), k=5)
    singles = torch.stack([score_fn(ens.member(case.model, m)) for m in range(4)])
    torch.testing.assert_close(result.mean, singles.mean(0))
    torch.testing.assert_close(result.stderr, singles.std(0) / 2)
    s = result.stability
    assert s.pairwise_topk.shape == (3,) and ((s.pairwise_topk >= 0) & (s.pairwise_topk <= 1)).all()
    assert set(s.summary()) == {"k", "pairwise_topk", "mean_topk", "pairwise_spearman"}


def test_stability_of_identical_and_reversed_members():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 30, generator=g)
    same = stability(torch.stack([base, base, base]), k=5)
    assert torch.equal(same.pairwise_topk, torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(same.pairwise_spearman, torch.ones(2, dtype=torch.float64))
    flipped = stability(torch.stack([base, -base]), k=5)
    assert (flipped.pairwise_topk == 0).all()
    torch.testing.assert_close(flipped.pairwise_spearman, -torch.ones(2, dtype=torch.float64))


def test_bad_arguments():
    with pytest.raises(ValueError, match="models"):
        ensemble_scores(lambda m: torch.zeros(1, 1), [torch.nn.Linear(1, 1)])
    with pytest.raises(ValueError, match="k"):
        stability(torch.zeros(2, 1, 3), k=4)
