"""LDS: exact influence on convex logistic regression, sign, caching, bad input."""

from __future__ import annotations

import pytest
import torch
from cases import digits
from torch import nn

from headwater.curvature import Exact
from headwater.evaluate.lds import lds, lds_ground_truth, spearman_rows, subset_masks
from headwater.evaluate.loo import leave_one_out
from headwater.methods import InfluenceFunction
from headwater.task import ClassificationTask
from headwater.train.ensemble import TrainConfig
from headwater.train.lbfgs import minimize_objective

CONVEX = TrainConfig(optimizer="lbfgs", init="copy", tol=1e-7)


@pytest.fixture(scope="module")
def logreg():
    xtr, ytr, xte, yte = digits()
    train, query = (xtr[:100], ytr[:100]), (xte[:20], yte[:20])
    model = nn.Linear(64, 10).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    task = ClassificationTask(weight_decay=0.1, measurement="margin")
    minimize_objective(model, task, train)
    scores = InfluenceFunction(model, task, Exact(damping=0.0)).fit(train).scores(query, train)
    return model, task, train, query, scores


def test_lds_of_exact_influence_on_logistic_regression(logreg, tmp_path):
    model, task, train, query, scores = logreg
    truth = lds_ground_truth(
        model, task, train, query, n_subsets=30, alpha=0.5, config=CONVEX, store_dir=tmp_path
    )
    result = lds(scores, truth)
    assert result.mean >= 0.9, result
    assert 0 < result.stderr < 0.05
    assert result.per_query.shape == (20,)
    # a sign flip turns the LDS negative
    assert lds(-scores, truth).mean <= -0.9
    # the ground truth is cached: a rerun trains nothing and gives the same numbers
    calls = []
    again = lds_ground_truth(
        model,
        task,
        train,
        query,
        n_subsets=30,
        alpha=0.5,
        config=CONVEX,
        store_dir=tmp_path,
        progress=lambda *a: calls.append(a),
    )
    assert calls == []
    assert torch.equal(again.actual, truth.actual) and torch.equal(again.masks, truth.masks)


def test_sign_removing_the_top_score_raises_the_measurement(logreg):
    model, task, train, query, scores = logreg
    q = 0
    top = int(scores[q].argmax())
    bottom = int(scores[q].argmin())
    loo = leave_one_out(model, task, train, query, [top, bottom], tol=1e-9)
    n = train[0].shape[0]
    assert loo.actual[q, 0] > 0 and loo.actual[q, 1] < 0
    ratio = loo.actual[q] / (scores[q, [top, bottom]] / n)
    assert ((ratio > 0.5) & (ratio < 2.0)).all(), ratio  # first order at n = 100


def test_subset_masks_are_seeded_and_exact_size():
    a = subset_masks(50, 7, 0.3, seed=3)
    assert a.shape == (7, 50) and (a.sum(dim=1) == 15).all()
    assert torch.equal(a, subset_masks(50, 7, 0.3, seed=3))
    b = subset_masks(
        50, 7, 0.3, seed=4
    )  # another seed: independent masks (disagree on 2·0.3·0.7 = 42%)
    assert (b.sum(dim=1) == 15).all() and 0.25 < float((a != b).double().mean()) < 0.6


def test_spearman_rows_matches_scipy():
    from scipy.stats import spearmanr

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 12, generator=g), torch.randn(3, 12, generator=g)
    a[0, :4] = 1.0  # ties
    ours = spearman_rows(a, b)
    for r in range(3):
        assert abs(ours[r].item() - spearmanr(a[r].numpy(), b[r].numpy()).statistic) < 1e-12
    assert torch.isnan(spearman_rows(torch.ones(1, 5), torch.randn(1, 5, generator=g)))[0]


def test_bad_input_names_the_argument(logreg):
    model, task, train, query, scores = logreg
    with pytest.raises(ValueError, match="alpha"):
        subset_masks(10, 5, 1.5, 0)
    with pytest.raises(ValueError, match="n_subsets"):
        subset_masks(10, 1, 0.5, 0)
    truth = lds_ground_truth(model, task, train, query, n_subsets=3, alpha=0.5, config=CONVEX)
    with pytest.raises(ValueError, match="scores"):
        lds(scores[:, :10], truth)
