"""Adding a curvature is one class and one registry entry: a toy curvature defined here
works with scores, top-k, self-influence, the plan and the command line."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
from cases import CASES
from oracles import dense_ggn, loop_gradients
from torch import Tensor

import headwater
from headwater.cli.main import main
from headwater.curvature import CURVATURES
from headwater.curvature.base import Curvature, Memory, ProblemSize, default_damping
from headwater.curvature.operators import dense_curvature
from headwater.plan import plan
from headwater.report import load_result


@dataclass(frozen=True)
class _MeanEigenvalueState:
    mean: Tensor  # [] float64: trace(M)/P
    damping: float


class MeanEigenvalue(Curvature):
    """``M ≈ (trace(M)/P)·I``: the curvature's mean eigenvalue times the identity."""

    name = "mean_eigenvalue"
    damping_in_state_only = True

    @classmethod
    def memory(cls, size: ProblemSize) -> Memory:
        return Memory(8, 8 * size.num_params * size.num_params, "dense matrix while fitting")

    @classmethod
    def _state_type(cls) -> type:
        return _MeanEigenvalueState

    def _fit(self, model, task, data, progress):
        matrix = dense_curvature(model, task, data, self.kind, chunk_size=self.chunk_size)
        mean = matrix.diagonal().double().mean()
        damping = default_damping(float(mean)) if self.damping is None else self.damping
        return _MeanEigenvalueState(mean, float(damping))

    def _solve(self, v: Tensor) -> Tensor:
        return v / (self.state.mean + self.state.damping).to(v.dtype)

    def _matvec(self, v: Tensor) -> Tensor:
        return v * (self.state.mean + self.state.damping).to(v.dtype)


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(CURVATURES, MeanEigenvalue.name, MeanEigenvalue)  # the one registry line


def test_scores_top_k_and_self_influence_match_the_dense_formula(registered):
    case = CASES["mlp"]()
    g_train = loop_gradients(case.model, case.task, case.train)  # [n, P]
    g_query = loop_gradients(case.model, case.task, case.query, measurement=True)  # [q, P]
    mean = float(dense_ggn(case.model, case.task, case.train).diagonal().mean())
    scale = mean + 0.1
    got = headwater.influence(
        case.model,
        case.train,
        case.query,
        task=case.task,
        curvature=MeanEigenvalue.name,
        damping=0.1,
        self_influence=True,
        chunk_size=7,
        query_chunk=2,
    )
    torch.testing.assert_close(got.values, g_query @ g_train.T / scale, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(
        got.self_influence, g_train.pow(2).sum(1) / scale, rtol=1e-9, atol=1e-12
    )
    assert got.settings["curvature"] == MeanEigenvalue.name
    top = headwater.influence(
        case.model,
        case.train,
        case.query,
        task=case.task,
        curvature=MeanEigenvalue.name,
        damping=0.1,
        top_k=4,
    )
    want = (g_query @ g_train.T / scale).topk(4, dim=1)
    assert torch.equal(top.indices, want.indices)
    torch.testing.assert_close(top.values, want.values, rtol=1e-9, atol=1e-12)


def test_plan_lists_it_from_its_memory_model(registered):
    case = CASES["mlp"]()
    row = plan(case.model, case.task, case.train, case.query, measure=False).row(
        MeanEigenvalue.name
    )
    p = sum(t.numel() for t in case.model.parameters())
    assert row.stored == 8 and row.note == "dense matrix while fitting"
    assert row.working >= 8 * p * p


def test_the_command_line_uses_it(registered, tmp_path, capsys):
    spec = tmp_path / "tiny.py"
    spec.write_text(
        "import torch\n"
        "g = torch.Generator().manual_seed(0)\n"
        "model = torch.nn.Sequential(torch.nn.Linear(4, 3))\n"
        "train = (torch.randn(12, 4, generator=g), torch.randint(0, 3, (12,), generator=g))\n"
        "query = (torch.randn(3, 4, generator=g), torch.randint(0, 3, (3,), generator=g))\n"
    )
    out = tmp_path / "out"
    args = [
        "score",
        str(spec),
        "--curvature",
        MeanEigenvalue.name,
        "--damping",
        "0.1",
        "--top-k",
        "2",
        "--threads",
        "1",
        "--no-report",
        "--quiet",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    result = load_result(out)
    assert result.scores.shape == (3, 12) and result.settings["curvature"] == MeanEigenvalue.name
    capsys.readouterr()
    assert main(["plan", str(spec), "--json", "--quiet"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert MeanEigenvalue.name in {r["method"] for r in printed["rows"]}
    assert MeanEigenvalue.name in printed["formulas"]
