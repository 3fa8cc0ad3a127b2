"""HYDRA's hypergradients equal finite differences of reweighting the same seeded run."""

import copy

import numpy as np
import pytest
import torch
from cases import CASES
from oracles import assert_close, loop_gradients

from headwater.evaluate import measure
from headwater.methods.hydra import Hydra
from headwater.train.sgd import SGDConfig, train_sgd

CONFIG = SGDConfig(lr=(0.2, 0.1, 0.05), epochs=3, batch_size=8, momentum=0.9, seed=3)


def _run(case, weights=None):
    model = copy.deepcopy(case.model)
    traj = train_sgd(model, case.task, case.train, CONFIG, weights=weights)
    return model, traj


@pytest.fixture(scope="module")
def run():
    case = CASES["mlp"]()
    model, traj = _run(case)
    hyper = Hydra(case.model, case.task, traj).hypergradients(case.query, case.train)
    return case, model, traj, hyper


def test_matches_finite_differences(run):
    case, _, _, hyper = run
    eps = 1e-5
    for i in (0, 7, 19):
        plus, minus = torch.ones(24, dtype=torch.float64), torch.ones(24, dtype=torch.float64)
        plus[i] += eps
        minus[i] -= eps
        fd = (
            measure(_run(case, plus)[0], case.task, case.query)
            - measure(_run(case, minus)[0], case.task, case.query)
        ) / (2 * eps)
        assert_close(hyper[:, i], fd, rtol=1e-5, atol=1e-9, what=f"hypergradient of example {i}")


def test_scores_predict_removal_and_hessian_matters(run):
    case, model, traj, hyper = run
    scores = Hydra(case.model, case.task, traj).scores(case.query, case.train)
    assert_close(scores, -24 * hyper, rtol=1e-12)
    base = measure(model, case.task, case.query)
    actual = []
    for i in range(24):
        w = torch.ones(24, dtype=torch.float64)
        w[i] = 0.0
        actual.append(measure(_run(case, w)[0], case.task, case.query) - base)
    actual = torch.stack(actual, 1)
    r = np.corrcoef((scores / 24).flatten().numpy(), actual.flatten().numpy())[0, 1]
    assert r > 0.95, f"Pearson(score/n, actual removal) = {r:.3f}"
    free = Hydra(case.model, case.task, traj, hessian_free=True).scores(case.query, case.train)
    r_free = np.corrcoef((free / 24).flatten().numpy(), actual.flatten().numpy())[0, 1]
    assert r_free < r, "dropping the Hessian terms should not predict removal better"


def test_hessian_free_one_full_batch_step():
    """One plain full-batch step without weight decay: HYDRA (Hessian-free) is
    ``n · (η/n) ∇m(z_q; θ_1)ᵀ∇ℓ(z_i; θ_0)`` — TracIn's form with the query at the end."""
    case = CASES["cnn"]()
    case.task.weight_decay = 0.0
    n = case.train[0].shape[0]
    model = copy.deepcopy(case.model)
    traj = train_sgd(model, case.task, case.train, SGDConfig(lr=0.1, epochs=1, batch_size=n))
    scores = Hydra(case.model, case.task, traj, hessian_free=True).scores(case.query, case.train)
    g0 = loop_gradients(case.model, case.task, case.train)
    gq1 = loop_gradients(model, case.task, case.query, measurement=True)
    assert_close(scores, 0.1 * gq1 @ g0.T, rtol=1e-9, what="hessian-free one step")


def test_bad_trajectory():
    case = CASES["mlp"]()
    with pytest.raises(TypeError, match="trajectory"):
        Hydra(case.model, case.task, "nope")
    with pytest.raises(ValueError, match="lr"):
        SGDConfig(lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        SGDConfig(momentum=1.0)
