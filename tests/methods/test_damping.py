"""Automatic damping selection against leave-one-out retraining."""

import pytest
import torch
from cases import CASES

from headwater.curvature import EKFAC, Exact, LiSSA
from headwater.methods.damping import DampingCurve, GroundTruth, select_damping


def test_convex_model_prefers_small_damping_and_reports_the_curve():
    case = CASES["linreg"]()
    dampings = [1e-6, 1e-2, 1.0, 100.0]
    curve = select_damping(
        case.model,
        case.task,
        case.train,
        case.query,
        dampings,
        curvature="exact",
        n_removed=8,
        seed=1,
    )
    assert isinstance(curve, DampingCurve)
    assert curve.agreement.shape == (4,) and curve.per_query.shape == (4, 5)
    assert (
        curve.agreement[0] > 0.95
    )  # exact influence on a convex model (n = 30: O(1/n²) terms remain)
    assert curve.agreement[-1] < curve.agreement[0]
    assert curve.best == dampings[int(curve.agreement.argmax())] and curve.best <= 1e-2
    assert list(curve.as_dict()) == dampings
    # The ground truth is reusable: another curvature, no retraining, same candidates.
    again = select_damping(
        case.model,
        case.task,
        case.train,
        case.query,
        dampings,
        curvature="cg",
        curvature_options={"tol": 1e-12},
        ground_truth=curve.ground_truth,
    )
    torch.testing.assert_close(again.agreement, curve.agreement, rtol=1e-6, atol=1e-8)
    spearman = select_damping(
        case.model,
        case.task,
        case.train,
        case.query,
        dampings,
        curvature=lambda d: Exact(damping=d),
        ground_truth=curve.ground_truth,
        metric="spearman",
    )
    assert spearman.agreement[0] > 0.9


def test_sign_flip_is_caught():
    case = CASES["linreg"]()
    curve = select_damping(
        case.model,
        case.task,
        case.train,
        case.query,
        [1e-6],
        curvature="exact",
        indices=[0, 3, 5, 7, 11, 13],
    )
    flipped = GroundTruth(
        -curve.ground_truth.actual, curve.ground_truth.indices, curve.ground_truth.model
    )
    bad = select_damping(
        case.model,
        case.task,
        case.train,
        case.query,
        [1e-6],
        curvature="exact",
        ground_truth=flipped,
    )
    assert bad.agreement[0] < -0.9


def test_bad_arguments():
    case = CASES["linreg"]()
    with pytest.raises(ValueError, match="dampings"):
        select_damping(case.model, case.task, case.train, case.query, [])
    with pytest.raises(ValueError, match="damping"):
        select_damping(case.model, case.task, case.train, case.query, [-1.0])
    with pytest.raises(ValueError, match="metric"):
        select_damping(case.model, case.task, case.train, case.query, [1.0], metric="kendall")
    with pytest.raises(ValueError, match="curvature"):
        select_damping(
            case.model, case.task, case.train, case.query, [1.0], curvature="nope", indices=[0, 1]
        )


def test_lissa_with_an_ekfac_preconditioner_converges_at_every_candidate():
    """LiSSA's scale and EK-FAC preconditioner depend on the damping: each candidate is a
    refitted copy (``with_damping``), so every solve matches the dense one; re-using the
    fitted state with only its damping field swapped diverged at damping 1 and 10."""
    case = CASES["mlp"]()
    dampings = [0.1, 1.0, 10.0]
    options = {"depth": 300, "preconditioner": "ekfac", "tol": 1e-12}
    curve = select_damping(
        case.model,
        case.task,
        case.train,
        case.query,
        dampings,
        curvature="lissa",
        curvature_options=options,
        indices=[0, 3, 5, 7, 11, 13],
    )
    exact = select_damping(
        case.model,
        case.task,
        case.train,
        case.query,
        dampings,
        curvature="exact",
        ground_truth=curve.ground_truth,
    )
    torch.testing.assert_close(curve.agreement, exact.agreement, rtol=1e-6, atol=1e-8)
    fitted = LiSSA(damping=dampings[0], **options).fit(case.model, case.task, case.train)
    v = torch.randn(
        2, fitted.layout.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
    )
    for damping in dampings[1:]:
        moved = fitted.with_damping(damping, model=case.model, task=case.task, data=case.train)
        dense = Exact(damping=damping).fit(case.model, case.task, case.train)
        torch.testing.assert_close(moved.solve(v), dense.solve(v), rtol=1e-8, atol=1e-10)
        assert fitted.fitted_damping == dampings[0] and moved.fitted_damping == damping


def test_with_damping_re_derives_or_names_the_missing_data():
    case = CASES["mlp"]()
    exact = Exact(damping=1e-2).fit(case.model, case.task, case.train)
    moved = exact.with_damping(1.0)  # the eigendecomposition is kept
    assert moved.state.eigvecs is exact.state.eigvecs and exact.fitted_damping == 1e-2
    dense = Exact(damping=1.0).fit(case.model, case.task, case.train)
    v = torch.randn(
        3, exact.layout.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
    )
    torch.testing.assert_close(moved.solve(v), dense.solve(v), rtol=1e-10, atol=1e-12)
    kfac = EKFAC(damping=1e-2).fit(case.model, case.task, case.train)
    with pytest.raises(ValueError, match="data"):
        kfac.with_damping(1.0)
    with pytest.raises(ValueError, match="damping"):
        exact.with_damping(None)
