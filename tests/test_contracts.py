"""The user's model is never changed, and bad input raises errors naming the argument."""

import math

import pytest
import torch
from cases import CASES
from torch import nn

import headwater
from headwater.curvature import Exact
from headwater.methods import InfluenceFunction
from headwater.task import ClassificationTask, Task


def _snapshot(model: nn.Module):
    return {
        "params": {k: v.detach().clone() for k, v in model.named_parameters()},
        "requires_grad": {k: v.requires_grad for k, v in model.named_parameters()},
        "grad": {
            k: None if v.grad is None else v.grad.clone() for k, v in model.named_parameters()
        },
        "modes": [m.training for m in model.modules()],
        "hooks": [
            (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
            for m in model.modules()
        ],
    }


def _same(a, b):
    assert (
        a["requires_grad"] == b["requires_grad"]
        and a["modes"] == b["modes"]
        and a["hooks"] == b["hooks"]
    )
    for k in a["params"]:
        assert torch.equal(a["params"][k], b["params"][k])
        assert (a["grad"][k] is None) == (b["grad"][k] is None)
        if a["grad"][k] is not None:
            assert torch.equal(a["grad"][k], b["grad"][k])


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_model_unchanged_after_every_call(name):
    case = CASES[name]()
    model = case.model
    model.train()
    model[0].eval() if isinstance(model, nn.Sequential) else model.conv.eval()  # mixed modes
    next(iter(model.parameters())).requires_grad_(False)
    list(model.parameters())[1].grad = torch.ones_like(list(model.parameters())[1])
    before = _snapshot(model)
    rng = torch.get_rng_state()
    headwater.influence(
        model,
        case.train,
        case.query,
        task=case.task,
        curvature="exact",
        damping=0.1,
        self_influence=True,
        top_k=2,
    )
    headwater.influence(
        model,
        case.train,
        case.query,
        task=case.task,
        projection=8,
        damping=0.1,
        self_influence=True,
        top_k=2,
        curvature_options={"ggn_estimator": "sampled"},
    )
    est = InfluenceFunction(model, case.task, Exact()).fit(case.train)
    est.scores(case.query, case.train)
    _same(before, _snapshot(model))
    assert torch.equal(rng, torch.get_rng_state())


class _NanTask(Task):
    def loss(self, output, targets):
        return torch.full((output.shape[0],), math.nan, dtype=output.dtype)


def test_bad_input_names_the_argument():
    case = CASES["mlp"]()
    m, tr, q = case.model, case.train, case.query
    with pytest.raises(ValueError, match="damping"):
        headwater.influence(m, tr, q, curvature="exact", damping=-1.0)
    with pytest.raises(TypeError, match="damping"):
        headwater.influence(m, tr, q, curvature="exact", damping="big")
    with pytest.raises(ValueError, match=r"train.*empty"):
        headwater.influence(m, (tr[0][:0], tr[1][:0]), q, curvature="exact")
    with pytest.raises(ValueError, match=r"query.*empty"):
        headwater.influence(m, tr, (q[0][:0], q[1][:0]), curvature="exact")
    with pytest.raises(ValueError, match="query: inputs of shape"):
        headwater.influence(
            m, tr, (torch.randn(3, 7, dtype=torch.float64), q[1][:3]), curvature="exact"
        )
    with pytest.raises(ValueError, match="train: inputs of shape"):
        headwater.influence(
            m, (torch.randn(3, 5, dtype=torch.float64), tr[1][:3]), q, curvature="exact"
        )
    with pytest.raises(ValueError, match=r"train.*NaN"):
        headwater.influence(m, tr, q, task=_NanTask(), curvature="exact")
    with pytest.raises(ValueError, match="modules"):
        headwater.influence(m, tr, q, task=ClassificationTask(modules=["nope"]), curvature="exact")
    frozen = nn.Linear(4, 3).double().requires_grad_(False)
    with pytest.raises(ValueError, match="modules"):
        headwater.influence(frozen, tr, q, curvature="exact")
    with pytest.raises(ValueError, match="curvature"):
        headwater.influence(m, tr, q, curvature="magic")
    with pytest.raises(ValueError, match="method"):
        headwater.influence(m, tr, q, method="magic", curvature="exact")
    with pytest.raises(ValueError, match="train: inputs and targets differ"):
        headwater.influence(m, (tr[0], tr[1][:3]), q, curvature="exact")
    with pytest.raises(TypeError, match="train"):
        headwater.influence(m, [1, 2, 3], q, curvature="exact")
    with pytest.raises(ValueError, match="weight_decay"):
        ClassificationTask(weight_decay=-1)
    with pytest.raises(ValueError, match="top_k"):
        headwater.influence(m, tr, q, curvature="exact", top_k=0)
    with pytest.raises(ValueError, match="kind"):
        Exact(kind="fisher-ish")
