"""headwater.plan: the stored sizes it predicts are the sizes of what the methods keep."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from cases import cnn, mlp
from torch import nn

from headwater.curvature import (
    CURVATURES,
    EKFAC,
    KFAC,
    MFAC,
    Arnoldi,
    Diagonal,
    Exact,
    Lanczos,
    Nystrom,
)
from headwater.gradients.projection import KroneckerProjection
from headwater.methods.factored import preconditioned_blocks
from headwater.methods.projected import ProjectedInfluence
from headwater.plan import _block_working, default_lowrank_size, plan
from headwater.task import ClassificationTask


def _state_bytes(curvature) -> int:
    total = 0
    for f in dataclasses.fields(curvature.state):
        value = getattr(curvature.state, f.name)
        for t in value.values() if isinstance(value, dict) else [value]:
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


@pytest.mark.parametrize("make", [mlp, cnn])
def test_stored_sizes_are_the_fitted_states(make, tmp_path):
    case = make()
    result = plan(
        case.model,
        case.task,
        case.train,
        case.query,
        measure=False,
        projection_dim=16,
        kronecker_dims=(2, 3),
    )
    assert result.num_params == sum(p.numel() for p in case.model.parameters())
    assert result.outputs == 3 and result.factored
    for name, curvature in (
        ("exact", Exact()),
        ("kfac", KFAC()),
        ("ekfac", EKFAC()),
        ("diagonal", Diagonal()),
        ("mfac", MFAC()),
    ):
        curvature.fit(case.model, case.task, case.train)
        assert result.row(name).stored == _state_bytes(curvature), name
    for method, projection in (
        ("projection 16", 16),
        ("kronecker projection 2x3", KroneckerProjection(2, 3)),
    ):
        est = ProjectedInfluence(case.model, case.task, projection, store=tmp_path / method).fit(
            case.train
        )
        rows = np.load(tmp_path / f"{method}-train.npy", mmap_mode="r")
        assert result.row(method).stored == rows.nbytes + 8 * est.dim**2, method


def test_budget_and_bad_input():
    case = mlp()
    small = plan(case.model, case.task, case.train, case.query, budget_bytes=1, measure=False)
    large = plan(case.model, case.task, case.train, case.query, budget_bytes=2**40, measure=False)
    assert not any(r.fits for r in small.rows) and all(r.fits for r in large.rows)
    assert small.recommended() is None and large.recommended().method == "exact"
    between = plan(
        case.model,
        case.task,
        case.train,
        case.query,
        measure=False,
        budget_bytes=large.row("exact").total - 1,
    )  # exact no longer fits: CG is next
    assert between.recommended().method == "cg"
    streamed = plan(case.model, case.task, case.train, case.query, top_k=True, measure=False)
    full = plan(case.model, case.task, case.train, case.query, measure=False)
    assert full.row("cg").working - streamed.row("cg").working == 5 * 24 * 8  # the score matrix
    timed = plan(case.model, case.task, case.train, case.query)
    assert timed.seconds_per_pass > 0
    with pytest.raises(ValueError, match="query_batch"):
        plan(case.model, case.task, case.train, case.query, query_batch=0)
    with pytest.raises(ValueError, match="chunk_size"):
        plan(case.model, case.task, case.train, case.query, chunk_size=0)


def test_every_registered_curvature_has_a_row_from_its_memory_model():
    case = mlp()
    result = plan(case.model, case.task, case.train, case.query, measure=False)
    methods = {r.method for r in result.rows}
    assert set(CURVATURES) <= methods  # arnoldi, lanczos, nystrom and mfac included
    for name in ("arnoldi", "lanczos", "nystrom", "mfac"):
        assert result.row(name).stored > 0 and result.row(name).working > 0, name
    assert result.resident > 0


def test_low_rank_queries_shrink_the_planned_queries_by_what_they_keep():
    """The query bytes the plan drops with ``query_rank`` are those LowRankBlocks drops."""
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 12), torch.nn.Tanh(), torch.nn.Linear(12, 3)
    ).double()
    g = torch.Generator().manual_seed(0)
    train = (torch.randn(30, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (30,)))
    query = (torch.randn(6, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (6,)))
    task = ClassificationTask(weight_decay=1e-2)
    curv = EKFAC().fit(model, task, train)

    def kept(rank):
        curv.query_rank = rank
        parts = preconditioned_blocks(model, task, curv, query, chunk_size=4, progress=None).parts
        flat = [t for p in parts.values() for t in (p if isinstance(p, tuple) else (p,))]
        return sum(t.numel() * t.element_size() for t in flat)

    def planned(rank):
        return plan(model, task, train, query, top_k=True, measure=False, query_rank=rank)

    full, low = planned(None), planned(2)
    assert kept(2) < kept(None)
    assert full.row("ekfac").stored == low.row("ekfac").stored
    # blocks [12, 9] -> 2·21 per query; [3, 13] -> 2·16 per query: both truncated
    assert kept(2) == 6 * 8 * (2 * 21 + 2 * 16) and kept(None) == 6 * 8 * (12 * 9 + 3 * 13)
    blocks = tuple((b.out_features, b.width) for b in curv.blocks)
    for rank in (None, 2):  # the plan's kept-query term is those bytes
        assert _block_working(blocks, 6, 64, 8, rank)[0] == kept(rank)
    assert full.row("ekfac").working > low.row("ekfac").working


@pytest.mark.parametrize(("width", "rank", "steps"), [(20, 200, 400), (4, 100, 134), (2, 72, 72)])
def test_low_rank_rows_assume_the_rank_and_steps_a_default_fit_reaches(width, rank, steps):
    """Arnoldi, Lanczos and Nyström rows use the estimators' own defaults at their largest:
    with every eigenvalue above the damping the rank doubles from 100 to 200 in 400 Krylov
    steps (630 parameters); with fewer than 200 parameters it stays 100 (134 parameters: 134
    steps) and both stop at ``P`` (72). A Krylov run whose space is exhausted (a breakdown)
    takes fewer steps: the plan is an upper bound."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(20, width), nn.Tanh(), nn.Linear(width, 10)).double()
    x = torch.randn(64, 20, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (64,), generator=g)
    train, query = (x[:60], y[:60]), (x[60:], y[60:])
    task = ClassificationTask(weight_decay=1e-2)  # every eigenvalue >= 1e-2 > the damping
    p = sum(t.numel() for t in model.parameters())
    result = plan(model, task, train, query, measure=False)
    assert default_lowrank_size(p) == (rank, steps)
    for name, cls in (("arnoldi", Arnoldi), ("lanczos", Lanczos), ("nystrom", Nystrom)):
        fitted = cls(damping=1e-3).fit(model, task, train)
        kept = fitted.state.eigvecs.shape[0]
        assert result.row(name).stored == 8 * rank * p, name
        if name == "nystrom":
            assert kept == rank
        else:  # the Krylov basis: one vector per step, fewer if the space is exhausted
            taken, exhausted = fitted.info.iterations, fitted.info.breakdown
            assert (kept, taken) == (rank, steps) or (exhausted and taken < steps), name
            assert result.row(name).note == f"rank {rank}, {steps} iterations", name
