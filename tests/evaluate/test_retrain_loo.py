"""Leave-one-out by paired ensemble retraining."""

from __future__ import annotations

import pytest
import torch
from cases import mlp
from torch import nn

from headwater.evaluate.loo import leave_one_out
from headwater.evaluate.retrain_loo import retrain_leave_one_out
from headwater.task import ClassificationTask
from headwater.train.ensemble import TrainConfig
from headwater.train.lbfgs import minimize_objective


def test_convex_retrain_loo_equals_lbfgs_loo():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (40,), generator=g)
    model = nn.Linear(5, 3).double()
    task = ClassificationTask(weight_decay=0.1, measurement="margin")
    minimize_objective(model, task, (x, y))
    query = (x[:4] + 0.1, y[:4])
    config = TrainConfig(optimizer="lbfgs", init="copy", normalization="n", tol=1e-9)
    ours = retrain_leave_one_out(model, task, (x, y), query, [0, 5, 9], config=config, n_seeds=1)
    reference = leave_one_out(model, task, (x, y), query, [0, 5, 9], tol=1e-9)
    torch.testing.assert_close(ours.actual, reference.actual, rtol=1e-4, atol=1e-7)
    assert torch.isnan(ours.stderr).all()


def test_nonconvex_paired_seeds_average_and_report_stderr(tmp_path):
    case = mlp(n_train=24, n_query=3)
    config = TrainConfig(optimizer="adam", lr=0.05, epochs=30, batch_size=8, normalization="n")
    result = retrain_leave_one_out(
        case.model,
        case.task,
        case.train,
        case.query,
        [1, 2],
        config=config,
        n_seeds=3,
        store_path=tmp_path,
    )
    assert result.actual.shape == (3, 2) and result.per_seed.shape == (3, 3, 2)
    torch.testing.assert_close(result.actual, result.per_seed.mean(0))
    assert (result.stderr >= 0).all()
    again = retrain_leave_one_out(
        case.model,
        case.task,
        case.train,
        case.query,
        [1, 2],
        config=config,
        n_seeds=3,
        store_path=tmp_path,
    )
    assert torch.equal(again.actual, result.actual)
    with pytest.raises(ValueError, match="indices"):
        retrain_leave_one_out(case.model, case.task, case.train, case.query, [99], config=config)
    with pytest.raises(ValueError, match="n_seeds"):
        retrain_leave_one_out(case.model, case.task, case.train, case.query, [1], n_seeds=0)
