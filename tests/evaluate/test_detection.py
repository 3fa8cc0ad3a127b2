"""Detection metrics: average precision equals sklearn's, ties earn chance, hand-checked cases."""

import pytest
import torch
from sklearn.metrics import average_precision_score

from headwater.evaluate.detection import auprc, detection_curve, precision_at_k, recall_at_fraction


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auprc_matches_sklearn_with_ties(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 20, (300,), generator=g).double()  # many ties
    flagged = torch.rand(300, generator=g) < 0.1
    assert auprc(scores, flagged) == pytest.approx(
        average_precision_score(flagged.numpy(), scores.numpy()), rel=1e-12
    )


def test_hand_checked_ranking():
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    flagged = torch.tensor([True, False, True, False, False, False])
    assert auprc(scores, flagged) == pytest.approx((1 + 2 / 3) / 2)
    assert precision_at_k(scores, flagged, 1) == 1.0
    assert precision_at_k(scores, flagged, 2) == 0.5
    assert recall_at_fraction(scores, flagged, 0.5) == 1.0
    assert recall_at_fraction(scores, flagged, 1 / 6) == pytest.approx(0.5)
    curve = detection_curve(scores, flagged)
    assert curve.inspected.tolist() == [1, 2, 3, 4, 5, 6] and curve.found.tolist() == [
        1,
        1,
        2,
        2,
        2,
        2,
    ]


def test_constant_scores_earn_chance_and_perfect_scores_earn_one():
    flagged = torch.zeros(100, dtype=torch.bool)
    flagged[::10] = True
    assert auprc(torch.zeros(100), flagged) == pytest.approx(0.1)
    assert precision_at_k(torch.zeros(100), flagged, 10) == pytest.approx(0.1)
    assert recall_at_fraction(torch.zeros(100), flagged, 0.3) == pytest.approx(0.3)
    assert auprc(flagged.double(), flagged) == 1.0
    assert auprc(-flagged.double(), flagged) == pytest.approx(
        0.1
    )  # flagged last: tied block at the end


def test_random_scores_are_near_chance():
    g = torch.Generator().manual_seed(0)
    flagged = torch.zeros(2000, dtype=torch.bool)
    flagged[:100] = True
    aps = [auprc(torch.rand(2000, generator=g), flagged) for _ in range(20)]
    assert abs(sum(aps) / len(aps) - 0.05) < 0.02


def test_errors_name_the_argument():
    s, f = torch.rand(5), torch.tensor([True, False, False, False, False])
    with pytest.raises(ValueError, match="flagged"):
        auprc(s, torch.zeros(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="flagged"):
        auprc(s, f[:4])
    with pytest.raises(ValueError, match="scores"):
        auprc(torch.tensor([1.0, float("nan"), 0, 0, 0]), f)
    with pytest.raises(ValueError, match="k"):
        precision_at_k(s, f, 0)
    with pytest.raises(ValueError, match="fraction"):
        recall_at_fraction(s, f, 1.5)
