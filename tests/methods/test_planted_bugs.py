"""Tests for bugs that once passed the whole suite when planted one at a time: a store key
without the weight decay, stochastic LiSSA always drawing one mini-batch, scoring a model
left in train mode (Dropout, BatchNorm), and the margin's log-sum-exp including the
correct class. (Sampled K-FAC's 1/mc_samples weight: tests/curvature/test_kfac.py.)"""

from __future__ import annotations

import math

import pytest
import torch
from cases import mlp
from torch import nn

import headwater
from headwater.curvature import LiSSA
from headwater.curvature import lissa as lissa_module
from headwater.methods.tracin import Checkpoint
from headwater.store import StoreMismatchError
from headwater.task import ClassificationTask


def test_a_store_fitted_with_another_weight_decay_only_is_refused(tmp_path):
    case = mlp(n_train=30)
    kwargs = dict(curvature="ekfac", damping=1e-2, store=tmp_path / "fit")
    headwater.influence(
        case.model, case.train, case.query, task=ClassificationTask(weight_decay=1e-2), **kwargs
    )
    with pytest.raises(StoreMismatchError, match="weight_decay") as err:
        headwater.influence(
            case.model, case.train, case.query, task=ClassificationTask(weight_decay=1e-1), **kwargs
        )
    assert err.value.keys == ("context.task.weight_decay",)


def test_a_projected_store_serves_another_weight_decay_with_its_own_scores(tmp_path):
    """The projected rows and Π M Πᵀ do not hold the weight decay (added after loading)."""
    case = mlp(n_train=30)
    other = ClassificationTask(weight_decay=1e-1)
    kwargs = dict(projection=12, damping=1e-2)
    headwater.influence(
        case.model, case.train, case.query, task=case.task, store=tmp_path / "p", **kwargs
    )
    loaded = headwater.influence(
        case.model, case.train, case.query, task=other, store=tmp_path / "p", **kwargs
    )
    fresh = headwater.influence(case.model, case.train, case.query, task=other, **kwargs)
    assert loaded.settings["store"]["curvature"].startswith("loaded")
    assert torch.allclose(loaded.values, fresh.values, rtol=1e-12, atol=0)


def test_stochastic_lissa_visits_every_mini_batch(monkeypatch):
    """batch_size=6 on 24 examples: each run of 4 steps is a permutation of the data in 4
    disjoint batches, and the next 4 steps draw another permutation."""
    case = mlp(n_train=24)
    seen: list[list[int]] = []
    real = lissa_module.subset

    def recording(data, indices):
        seen.append(sorted(torch.as_tensor(indices).tolist()))
        return real(data, indices)

    monkeypatch.setattr(lissa_module, "subset", recording)
    curv = LiSSA(damping=0.1, depth=8, repeats=1, batch_size=6, scale=50.0, seed=1).fit(
        case.model, case.task, case.train
    )
    seen.clear()
    curv.solve(
        torch.randn(
            1,
            curv.layout.num_params,
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(0),
        )
    )
    assert len(seen) == 8
    for epoch in (seen[:4], seen[4:]):
        assert sorted(i for batch in epoch for i in batch) == list(range(24))  # every example, once
    assert seen[:4] != seen[4:]  # a fresh permutation for the second pass
    assert len({tuple(b) for b in seen}) == 8


class DropNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.drop, self.fc2 = (
            nn.Linear(4, 6),
            nn.BatchNorm1d(6),
            nn.Dropout(0.5),
            nn.Linear(6, 3),
        )

    def forward(self, x):
        return self.fc2(self.drop(torch.tanh(self.norm(self.fc1(x)))))


@pytest.mark.parametrize(
    "options",
    [
        {"curvature": "ekfac"},
        {"curvature": "exact"},
        {"curvature": "identity"},
        {"projection": 8},
        {"method": "tracin"},
    ],
    ids=str,
)
def test_a_model_left_in_train_mode_scores_as_in_eval_mode_and_stays_in_train_mode(options):
    torch.manual_seed(0)
    model = DropNormNet().double()
    case = mlp(n_train=20)
    with torch.no_grad():  # non-trivial running statistics, then a model left in train mode
        for _ in range(5):
            model(3 * torch.randn(16, 4, dtype=torch.float64) + 1)
    task = ClassificationTask(weight_decay=1e-2, modules=["fc1", "fc2"])
    extra = (
        {"checkpoints": [Checkpoint(model.state_dict(), lr=0.1)]}
        if "method" in options
        else {"damping": 1e-2}
    )

    def scores():
        return headwater.influence(
            model, case.train, case.query, task=task, self_influence=True, **options, **extra
        )

    model.eval()
    want = scores()
    model.train()
    model.norm.eval()  # a mixed mode the user chose must survive too
    got = scores()
    assert torch.equal(got.values, want.values) and torch.equal(
        got.self_influence, want.self_influence
    )
    assert model.training and model.fc1.training and model.drop.training and not model.norm.training


def test_the_margin_against_a_hand_computed_three_class_value():
    """Logits (2, -1, 0.5), class 0: margin = 2 - log(e^-1 + e^0.5) = 2 - log(2.016601) = 1.298587
    (the correct class is left out of the log-sum-exp; with it: 2 - log(9.405657) = -0.241311)."""
    model = nn.Linear(1, 3).double()
    with torch.no_grad():
        model.weight.zero_()
        model.bias.copy_(torch.tensor([2.0, -1.0, 0.5]))
    task = ClassificationTask(measurement="margin")
    x, y = torch.zeros(2, 1, dtype=torch.float64), torch.tensor([0, 2])
    got = task.measurement(model, (x, y))
    assert got[0].item() == pytest.approx(1.298587, abs=1e-6)
    assert got[1].item() == pytest.approx(
        0.5 - math.log(math.exp(2.0) + math.exp(-1.0)), rel=1e-12
    )  # -1.548587
