"""Unlearning by a Newton step on the remaining objective (Mehta et al. 2022) vs retraining."""

import copy

import pytest
import torch
from cases import digits
from oracles import dense_hessian
from torch import nn

from headwater.curvature import EKFAC, Exact
from headwater.gradients.per_example import per_example_gradients
from headwater.methods import unlearn
from headwater.task import ClassificationTask
from headwater.train import minimize_objective

FORGET = [3, 17, 40, 41, 99]


def _problem(modules=None):
    """L2 logistic regression on 3 digit classes (64 -> 3: 195 parameters), float64."""
    xtr, ytr, _, _ = digits()
    keep = ytr < 3
    x, y = xtr[keep][:120], ytr[keep][:120]
    model = (
        nn.Sequential(nn.Linear(64, 8), nn.Linear(8, 3)).double()
        if modules
        else nn.Linear(64, 3).double()
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    task = ClassificationTask(weight_decay=1e-2, modules=modules)
    minimize_objective(model, task, (x, y), tol=1e-9)
    return model, task, (x, y)


def _retrained(model, task, train, forget):
    n = train[0].shape[0]
    w = torch.full((n,), 1.0 / (n - len(forget)), dtype=torch.float64)
    w[forget] = 0.0
    fresh = copy.deepcopy(model)
    minimize_objective(fresh, task, train, weights=w, tol=1e-9)
    return fresh


def _flat(model, task):
    return torch.cat([p.detach().reshape(-1) for p in task.parameters(model).values()])


@pytest.fixture(scope="module")
def logreg():
    model, task, train = _problem()
    return model, task, train, _retrained(model, task, train, FORGET)


def test_matches_retraining(logreg):
    model, task, train, truth = logreg
    before = copy.deepcopy(model.state_dict())
    new = unlearn(model, task, train, FORGET)
    theta, target, got = _flat(model, task), _flat(truth, task), _flat(new, task)
    change = (target - theta).norm()
    assert change > 1e-3
    assert (got - target).norm() < 2e-2 * change  # Newton: second order (measured 0.01)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the user's model is untouched
    assert new is not model


def test_single_example_formula(logreg):
    """θ_new = θ̂ + ((nH − ∇²ℓ̃_i)/(n−1))⁻¹ (1/(n−1)) ∇ℓ̃_i with dense matrices."""
    model, task, train, _ = logreg
    x, y = train
    n, i = x.shape[0], 7
    theta = _flat(model, task)
    h_full = dense_hessian(model, task, train)
    h_i = dense_hessian(model, task, (x[i : i + 1], y[i : i + 1]))  # includes wd: ∇²ℓ̃_i
    model.zero_grad()
    loss = task.train_loss(model, (x[i : i + 1], y[i : i + 1])).sum()
    g_i = torch.cat([t.reshape(-1) for t in torch.autograd.grad(loss, list(model.parameters()))])
    g_i = g_i + task.weight_decay * theta
    expected = theta + torch.linalg.solve((n * h_full - h_i) / (n - 1), g_i / (n - 1))
    got = _flat(unlearn(model, task, train, [i]), task)
    torch.testing.assert_close(got, expected, rtol=1e-7, atol=1e-9)


def test_curvature_paths(logreg):
    model, task, train, truth = logreg
    exact_path = _flat(unlearn(model, task, train, FORGET), task)
    curv = Exact(kind="hessian", damping=0.0).fit(model, task, train)
    corrected = _flat(unlearn(model, task, train, FORGET, curvature=curv), task)
    torch.testing.assert_close(corrected, exact_path, rtol=1e-7, atol=1e-8)
    remaining = _flat(unlearn(model, task, train, FORGET, gradient="remaining"), task)
    torch.testing.assert_close(remaining, exact_path, rtol=1e-6, atol=1e-7)
    theta, target = _flat(model, task), _flat(truth, task)
    change = (target - theta).norm()
    plain = _flat(unlearn(model, task, train, FORGET, curvature=curv, correction=False), task)
    assert (plain - target).norm() < 0.2 * change  # the influence step: O(k/n) worse, still useful
    assert (corrected - target).norm() < (plain - target).norm()
    ekfac = EKFAC(damping=1e-6).fit(model, task, train)  # approximate: ~0.4 of the change left
    approx = _flat(unlearn(model, task, train, FORGET, curvature=ekfac), task)
    assert (approx - target).norm() < 0.6 * change


def test_parameter_subset():
    model, task, train = _problem(modules=["1"])
    new = unlearn(model, task, train, FORGET, kind="ggn")
    truth = _retrained(model, task, train, FORGET)  # retrains only the selected layer
    for name, p in model.named_parameters():
        q = dict(new.named_parameters())[name]
        if name.startswith("0."):
            assert torch.equal(p, q)
    theta, target, got = _flat(model, task), _flat(truth, task), _flat(new, task)
    assert (got - target).norm() < 0.15 * (target - theta).norm()  # measured 0.07


def test_errors(logreg):
    model, task, train, _ = logreg
    with pytest.raises(ValueError, match="forget"):
        unlearn(model, task, train, [])
    with pytest.raises(ValueError, match="forget"):
        unlearn(model, task, train, [1, 1])
    with pytest.raises(ValueError, match="forget"):
        unlearn(model, task, train, [10_000])
    with pytest.raises(ValueError, match="curvature"):
        unlearn(model, task, train, [1], curvature=Exact())
    with pytest.raises(ValueError, match="gradient"):
        unlearn(model, task, train, [1], gradient="all")


def test_an_approximate_curvature_is_refitted_on_the_remaining_data(logreg):
    """EK-FAC's H_{-S} is EK-FAC of the remaining data (not EK-FAC minus exact per-example
    curvature): the step is (EK-FAC_{-S})⁻¹ Σ_S ∇ℓ̃_i / (n − k), and the fitted curvature
    passed in is left as it was."""
    model, task, train, _ = logreg
    n, k = train[0].shape[0], len(FORGET)
    full = EKFAC(damping=1e-3).fit(model, task, train)
    state = copy.deepcopy(full.state)
    got = _flat(unlearn(model, task, train, FORGET, curvature=full), task)
    keep = [i for i in range(n) if i not in FORGET]
    remaining = EKFAC(damping=1e-3).fit(model, task, (train[0][keep], train[1][keep]))
    theta = _flat(model, task)
    grads = torch.cat(
        list(per_example_gradients(model, task, (train[0][FORGET], train[1][FORGET])))
    )
    rhs = (grads.sum(dim=0) + k * task.weight_decay * theta) / (n - k)
    torch.testing.assert_close(got, theta + remaining.solve(rhs), rtol=1e-10, atol=1e-12)
    assert full.n_examples == n
    for name in ("eigvals_a", "eigvecs_s", "corrected"):
        for module, tensor in getattr(state, name).items():
            assert torch.equal(getattr(full.state, name)[module], tensor)
