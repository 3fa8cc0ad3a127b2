"""Local ensembles (Madras et al. 2020): extrapolation scores vs a dense computation."""

import copy

import pytest
import torch
from cases import mlp
from oracles import assert_close, dense_ggn
from torch import nn

from headwater.curvature import Exact, Lanczos
from headwater.task import RegressionTask
from headwater.train import minimize_objective
from headwater.uncertainty import extrapolation_scores, flat_subspace


def _subspace_regression(seed: int = 0):
    """Linear regression 5 -> 1 whose training inputs span a 3-d subspace of R^5."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(5, 3, generator=g, dtype=torch.float64))[0]  # [5, 3]
    x = torch.randn(40, 3, generator=g, dtype=torch.float64) @ basis.T
    y = x @ torch.randn(5, 1, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        40, 1, generator=g, dtype=torch.float64
    )
    model = nn.Linear(5, 1).double()
    task = RegressionTask()
    minimize_objective(model, task, (x, y), tol=1e-10)
    inside = torch.randn(6, 3, generator=g, dtype=torch.float64) @ basis.T
    outside_dir = torch.randn(6, 5, generator=g, dtype=torch.float64)
    outside_dir = outside_dir - outside_dir @ basis @ basis.T  # orthogonal to the span
    return model, task, (x, y), inside, inside + outside_dir, outside_dir


def test_zero_in_span_positive_outside():
    model, task, train, inside, outside, off = _subspace_regression()
    curv = Exact(damping=1e-6).fit(model, task, train)
    # 3 input directions + the bias: rank-4 GGN; the rest of its spectrum is 0
    inside_scores = extrapolation_scores(model, task, curv, inside, min_eigval=1e-8)
    outside_scores = extrapolation_scores(model, task, curv, outside, min_eigval=1e-8)
    assert inside_scores.shape == (6,)
    assert inside_scores.abs().max() < 1e-8
    # for a linear model the gradient is (x, 1): the score is the norm of x's off-span part
    assert_close(outside_scores, off.norm(dim=1), rtol=1e-8, what="outside scores")


def test_lanczos_matches_exact():
    model, task, train, inside, outside, _ = _subspace_regression()
    exact = Exact(damping=1e-6).fit(model, task, train)
    lanczos = Lanczos(rank=4, n_iter=6, damping=0.0, residual=False).fit(model, task, train)
    both = torch.cat([inside, outside])
    assert_close(
        extrapolation_scores(model, task, lanczos, both),
        extrapolation_scores(model, task, exact, both, rank=4),
        rtol=1e-6,
        atol=1e-8,
        what="Lanczos vs Exact",
    )


@pytest.mark.parametrize("prediction", ["predicted_logit", "predicted_probability", "per_output"])
def test_classifier_matches_dense(prediction):
    case = mlp()
    model, task = case.model, case.task
    before = copy.deepcopy(model.state_dict())
    curv = Exact(damping=1e-6).fit(model, task, case.train)
    rank = 10
    scores = extrapolation_scores(
        model, task, curv, case.query[0], rank=rank, prediction=prediction, chunk_size=2
    )
    # dense: eigenvectors of the oracle GGN, Jacobians by autograd
    vals, vecs = torch.linalg.eigh(dense_ggn(model, task, case.train))
    u = vecs[:, vals.abs().argsort(descending=True)[:rank]]  # [P, m]
    params = list(model.parameters())
    rows = []
    for x in case.query[0]:
        logits = model(x.unsqueeze(0))[0]
        top = int(logits.argmax())
        if prediction == "per_output":
            outs = list(logits)
        elif prediction == "predicted_logit":
            outs = [logits[top]]
        else:
            outs = [torch.softmax(logits, 0)[top]]
        grads = [
            torch.cat([t.reshape(-1) for t in torch.autograd.grad(o, params, retain_graph=True)])
            for o in outs
        ]
        rows.append(torch.stack([(gr - u @ (u.T @ gr)).norm() for gr in grads]))
    expected = torch.stack(rows).squeeze(1) if prediction != "per_output" else torch.stack(rows)
    assert_close(scores, expected, rtol=1e-6, atol=1e-10, what=prediction)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_errors():
    model, task, train, inside, _, _ = _subspace_regression()
    curv = Exact(damping=1e-6)
    with pytest.raises(ValueError, match="curvature"):
        extrapolation_scores(model, task, curv, inside, rank=2)
    curv.fit(model, task, train)
    with pytest.raises(ValueError, match="rank"):
        extrapolation_scores(model, task, curv, inside)
    with pytest.raises(ValueError, match="rank"):
        flat_subspace(curv, rank=99)
    with pytest.raises(ValueError, match="prediction"):
        extrapolation_scores(model, task, curv, inside, rank=2, prediction="nope")
    with pytest.raises(ValueError, match="curvature"):
        extrapolation_scores(model, RegressionTask(modules=["weight"]), curv, inside, rank=2)
