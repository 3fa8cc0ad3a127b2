"""Automatic damping selection against leave-one-out retraining."""

import pytest
import torch
from cases import CASES

from headwater.curvature import Exact
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
