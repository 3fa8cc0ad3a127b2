"""headwater.plan: the stored sizes it predicts are the sizes of what the methods keep."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from cases import cnn, mlp

from headwater.curvature import EKFAC, KFAC, MFAC, Diagonal, Exact
from headwater.gradients.projection import KroneckerProjection
from headwater.methods.projected import ProjectedInfluence
from headwater.plan import plan


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
