"""PBRF: equals LOO on a convex linear model, matches damped-GGN influence to first order."""

from __future__ import annotations

import pytest
import torch
from cases import digits, mlp
from torch import nn

from headwater.curvature import Exact
from headwater.evaluate.loo import leave_one_out
from headwater.evaluate.pbrf import pbrf
from headwater.methods import InfluenceFunction
from headwater.task import ClassificationTask
from headwater.train.lbfgs import minimize_objective


@pytest.fixture(scope="module")
def logreg():
    xtr, ytr, xte, yte = digits()
    train, query = (xtr[:80, :32], ytr[:80] % 4), (xte[:10, :32], yte[:10] % 4)
    model = nn.Linear(32, 4).double()
    nn.init.zeros_(model.weight)
    nn.init.zeros_(model.bias)
    task = ClassificationTask(weight_decay=0.05)
    minimize_objective(model, task, train)
    return model, task, train, query


def test_pbrf_matches_leave_one_out_on_the_convex_model(logreg):
    model, task, train, query = logreg
    removed = list(range(0, 80, 8))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = pbrf(model, task, train, query, removed, damping=0.0)
    loo = leave_one_out(model, task, train, query, removed, tol=1e-10)
    a, b = result.response.flatten(), loo.actual.flatten()
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert corr >= 0.95
    # for a linear model and damping 0 the PBRF objective *is* the LOO objective
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_pbrf_is_influence_over_n_to_first_order_with_damping():
    case = mlp(n_train=24, n_query=5)
    damping = 0.1
    curvature = Exact(damping=damping)
    scores = (
        InfluenceFunction(case.model, case.task, curvature)
        .fit(case.train)
        .scores(case.query, case.train)
    )
    removed = [0, 3, 7, 11]
    # a small epsilon makes the response linear; it is then epsilon * score
    result = pbrf(
        case.model,
        case.task,
        case.train,
        case.query,
        removed,
        damping=damping,
        epsilon=1e-5,
        tol=1e-12,
    )
    # O(epsilon * n) curvature error of the removed example's own Hessian: ~1e-3 relative
    torch.testing.assert_close(result.response / 1e-5, scores[:, removed], rtol=2e-3, atol=1e-5)
    # removal (epsilon = 1/n) has the sign of the score
    full = pbrf(case.model, case.task, case.train, case.query, removed, damping=damping)
    big = scores[:, removed].abs() > 0.05
    assert (torch.sign(full.response[big]) == torch.sign(scores[:, removed][big])).all()


def test_bad_arguments(logreg):
    model, task, train, query = logreg
    with pytest.raises(ValueError, match="damping"):
        pbrf(model, task, train, query, [0], damping=-1.0)
    with pytest.raises(ValueError, match="indices"):
        pbrf(model, task, train, query, [500], damping=0.0)
