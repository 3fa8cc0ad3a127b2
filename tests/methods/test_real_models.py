"""Architectures as users bring them, with no ``modules=`` and no wrapper module: a small
ResNet-style CNN with BatchNorm, Dropout and residual blocks given as a DataLoader, and a
regression MLP; on a trained classifier the top proponents of a test example share its label."""

import pytest
import torch
from cases import digits
from oracles import assert_close, dense_ggn, influence_scores
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import headwater
from headwater.task import ClassificationTask, RegressionTask


class Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width)

    def forward(self, x):
        return torch.relu(x + self.norm(self.conv(x)))


class SmallResNet(nn.Module):
    """8x8 digits: conv-BN stem, one residual block, dropout, global pooling, linear head."""

    def __init__(self, width: int = 8, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()
        )
        self.block = Residual(width)
        self.drop = nn.Dropout(0.2)
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.block(self.stem(x.reshape(-1, 1, 8, 8)))
        return self.head(self.drop(h.mean(dim=(2, 3))))


def _trained_resnet(n_train: int = 300):
    xtr, ytr, xte, yte = digits(n_train=n_train, n_test=30)
    torch.manual_seed(0)
    model = SmallResNet().double()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    model.train()
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(xtr), ytr).backward()
        opt.step()
    return model, (xtr, ytr), (xte, yte)


@pytest.fixture(scope="module")
def resnet():
    return _trained_resnet()


def test_resnet_from_a_dataloader_runs_exact_cg_and_identity(resnet):
    """In train mode (as left after training): scores use eval mode (BatchNorm's running
    statistics, no dropout) and leave the statistics and the mode alone."""
    model, (xtr, ytr), (xte, yte) = resnet
    train = DataLoader(TensorDataset(xtr[:60], ytr[:60]), batch_size=16)
    query = DataLoader(TensorDataset(xte[:5], yte[:5]), batch_size=2)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    exact = headwater.influence(model, train, query, curvature="exact", damping=1e-2)
    # unpreconditioned: on this BatchNorm ResNet the EK-FAC preconditioner (like the exact
    # diagonal) raises the condition number, 1.3e4 -> 5.7e4 (diagonal 1.1e5), so the default
    # preconditioned CG needs far more than 500 iterations for this tolerance
    cg = headwater.influence(
        model,
        train,
        query,
        curvature="cg",
        damping=1e-2,
        curvature_options={"tol": 1e-9, "preconditioner": "none"},
    )
    identity = headwater.influence(model, train, query, curvature="identity")
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    task, dense_train = ClassificationTask(), (xtr[:60], ytr[:60])
    want = influence_scores(
        model.eval(),
        task,
        dense_train,
        (xte[:5], yte[:5]),
        dense_ggn(model, task, dense_train),
        1e-2,
    )
    assert_close(exact.values, want, rtol=1e-6, atol=1e-9 * float(want.abs().max()), what="exact")
    assert_close(cg.values, want, rtol=1e-5, atol=1e-7 * float(want.abs().max()), what="CG")
    assert identity.values.shape == (5, 60) and torch.isfinite(identity.values).all()


def test_resnet_runs_with_the_default_curvature(resnet):
    model, (xtr, ytr), (xte, yte) = resnet
    scores = headwater.influence(
        model, DataLoader(TensorDataset(xtr[:40], ytr[:40]), batch_size=16), (xte[:3], yte[:3])
    )
    assert torch.isfinite(scores.values).all()


def test_top_proponents_share_the_test_label_far_above_chance(resnet):
    """Chance is ~0.1 (ten classes); measured 0.51 for the proponents and 0.10 for the
    opponents of the 26 correctly classified test digits, so a sign error (opponents
    ranked first) fails both bounds."""
    model, (xtr, ytr), (xte, yte) = resnet
    scores = headwater.influence(
        model, (xtr, ytr), (xte, yte), curvature="exact", top_k=10, progress=False
    )
    correct = model.eval()(xte).argmax(1) == yte
    same = (ytr[scores.indices] == yte[:, None]).double()[correct]  # [n_correct, 10]
    opposite = (ytr[scores.opponent_indices] == yte[:, None]).double()[correct]
    assert correct.sum() >= 20
    assert same.mean() >= 0.4, float(same.mean())
    assert opposite.mean() <= 0.2, float(opposite.mean())


def test_regression_mlp_needs_no_task_and_matches_the_dense_solve():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 3, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(1, keepdim=True)) + 0.1 * torch.randn(
        40, 1, generator=g, dtype=torch.float64
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    train, query = (x[:32], y[:32]), (x[32:], y[32:])
    want = influence_scores(
        model, RegressionTask(), train, query, dense_ggn(model, RegressionTask(), train), 1e-3
    )
    for curvature in ("exact", "cg"):
        got = headwater.influence(
            model,
            train,
            query,
            curvature=curvature,
            damping=1e-3,
            curvature_options={"tol": 1e-10} if curvature == "cg" else None,
        )
        assert got.settings["task"]["task"] == "RegressionTask"
        assert_close(
            got.values, want, rtol=1e-5, atol=1e-8 * float(want.abs().max()), what=curvature
        )
    assert torch.isfinite(
        headwater.influence(model, train, query, curvature="identity").values
    ).all()
