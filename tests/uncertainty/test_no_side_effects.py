"""Local ensembles, linearised Laplace and unlearning leave the user's model and the RNG alone."""

import torch
from cases import mlp

from headwater.curvature import Exact
from headwater.methods import unlearn
from headwater.uncertainty import LinearizedLaplace, extrapolation_scores


def _snapshot(model):
    return (
        {k: v.detach().clone() for k, v in model.named_parameters()},
        {k: v.requires_grad for k, v in model.named_parameters()},
        {k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()},
        [m.training for m in model.modules()],
    )


def test_model_and_rng_unchanged():
    case = mlp()
    model, task = case.model, case.task
    model.train()
    model[0].eval()  # mixed modes
    list(model.parameters())[3].grad = torch.ones_like(list(model.parameters())[3])
    before = _snapshot(model)
    rng = torch.get_rng_state()
    curv = Exact(damping=1e-3).fit(model, task, case.train)
    extrapolation_scores(model, task, curv, case.query[0], rank=5)
    la = LinearizedLaplace(model, task, curv, stationarity_tol=1e9).fit(case.train)
    la.probabilities(case.query[0], method="mc", n_samples=10)
    new = unlearn(model, task, case.train, [0, 1], kind="ggn")
    after = _snapshot(model)
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:2] == after[1:2] and before[3] == after[3]
    assert all((before[2][k] is None) == (after[2][k] is None) for k in before[2])
    assert torch.equal(after[2]["2.bias"], torch.ones(3, dtype=torch.float64))
    assert torch.equal(torch.get_rng_state(), rng)
    assert not torch.equal(new[2].weight, model[2].weight)
