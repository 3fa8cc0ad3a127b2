"""Detection metrics: how well a score ranks a small set of flagged examples first.

Used for mislabel detection by self-influence (Koh & Liang 2017) and for ranking a
training-set attack's instances by their influence on the target (Hammoudeh & Lowd
2022, who report the area under the precision-recall curve). Pure functions of a
score vector ``[n]`` (larger = more suspicious) and a boolean ground truth ``[n]``.

Ties are handled as sklearn does: examples with equal scores are inspected together,
so a constant score earns exactly the chance rate, never a lucky order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "DetectionCurve",
    "auprc",
    "detection_curve",
    "precision_at_k",
    "recall_at_fraction",
]


@dataclass(frozen=True)
class DetectionCurve:
    """Inspection curve over the distinct score thresholds, most suspicious first.

    Attributes:
        inspected: ``[T]`` number of examples inspected at each threshold.
        found: ``[T]`` number of flagged examples among them.
        n_flagged: total number of flagged examples.
    """

    inspected: Tensor
    found: Tensor
    n_flagged: int

    @property
    def precision(self) -> Tensor:
        """``[T]`` found / inspected."""
        return self.found.double() / self.inspected.double()

    @property
    def recall(self) -> Tensor:
        """``[T]`` found / n_flagged."""
        return self.found.double() / self.n_flagged


def _check(scores: Tensor, flagged: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(scores, Tensor) or scores.dim() != 1:
        raise ValueError(
            f"scores: expected a 1-D tensor [n], got {getattr(scores, 'shape', type(scores))}"
        )
    if not isinstance(flagged, Tensor) or flagged.shape != scores.shape:
        raise ValueError(
            f"flagged: expected a boolean tensor of shape {tuple(scores.shape)}, "
            f"got {getattr(flagged, 'shape', type(flagged))}"
        )
    if scores.numel() == 0:
        raise ValueError("scores: is empty")
    if not torch.isfinite(scores).all():
        raise ValueError("scores: contains NaN/inf")
    if flagged.dtype != torch.bool:
        if not ((flagged == 0) | (flagged == 1)).all():
            raise ValueError("flagged: expected booleans (or 0/1)")
        flagged = flagged.bool()
    if not flagged.any():
        raise ValueError("flagged: no example is flagged; the metrics are undefined")
    return scores.detach().double().cpu(), flagged.cpu()


def detection_curve(scores: Tensor, flagged: Tensor) -> DetectionCurve:
    """Inspect examples in decreasing ``scores`` order, tied scores together.

    Args:
        scores: ``[n]`` suspicion score per example (larger = inspect earlier).
        flagged: ``[n]`` boolean ground truth (e.g. label flipped, poisoned).

    Returns:
        :class:`DetectionCurve` with one point per distinct score value.

    Raises:
        ValueError: naming ``scores``/``flagged`` for wrong shapes, NaN/inf or no flagged example.
    """
    s, f = _check(scores, flagged)
    order = torch.argsort(s, descending=True, stable=True)
    s, f = s[order], f[order]
    found = torch.cumsum(f.long(), 0)
    last_of_group = torch.ones_like(f)
    last_of_group[:-1] = s[1:] != s[:-1]
    idx = last_of_group.nonzero().squeeze(1)
    return DetectionCurve(inspected=idx + 1, found=found[idx], n_flagged=int(f.sum()))


def auprc(scores: Tensor, flagged: Tensor) -> float:
    """Area under the precision-recall curve as average precision (no interpolation):

        AP = Σ_t (R_t − R_{t−1}) · P_t

    over the distinct thresholds ``t``. Chance level is the flagged fraction.

    Args:
        scores: ``[n]`` suspicion score per example.
        flagged: ``[n]`` boolean ground truth.

    Returns:
        A float in ``(0, 1]``; 1 when every flagged example outranks every other.
    """
    curve = detection_curve(scores, flagged)
    recall = curve.recall
    gain = torch.diff(recall, prepend=torch.zeros(1, dtype=recall.dtype))
    return float((gain * curve.precision).sum())


def _interpolated_found(curve: DetectionCurve, budget: float) -> float:
    """Expected number found after inspecting ``budget`` examples, a tied group being
    inspected in random order (linear interpolation inside the group)."""
    inspected = curve.inspected.double()
    found = curve.found.double()
    pos = int(torch.searchsorted(inspected, torch.tensor([budget], dtype=torch.float64)).item())
    if pos >= inspected.numel():
        return float(found[-1])
    prev_i = float(inspected[pos - 1]) if pos > 0 else 0.0
    prev_f = float(found[pos - 1]) if pos > 0 else 0.0
    share = (budget - prev_i) / (float(inspected[pos]) - prev_i)
    return prev_f + share * (float(found[pos]) - prev_f)


def precision_at_k(scores: Tensor, flagged: Tensor, k: int) -> float:
    """Fraction of flagged examples among the ``k`` highest scores (ties shared fairly).

    Raises:
        ValueError: if ``k`` is not an integer in ``[1, n]``.
    """
    n = scores.shape[0] if isinstance(scores, Tensor) and scores.dim() == 1 else -1
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= max(n, 1):
        raise ValueError(f"k: expected an integer in [1, {n}], got {k!r}")
    return _interpolated_found(detection_curve(scores, flagged), float(k)) / k


def recall_at_fraction(scores: Tensor, flagged: Tensor, fraction: float) -> float:
    """Fraction of the flagged examples found after inspecting the top ``fraction``
    of all examples by score (Koh & Liang 2017, Fig. 6: "fraction of flips found"
    against "fraction of training data checked").

    Raises:
        ValueError: if ``fraction`` is not in ``(0, 1]``.
    """
    if (
        isinstance(fraction, bool)
        or not isinstance(fraction, int | float)
        or not math.isfinite(fraction)
        or not 0 < fraction <= 1
    ):
        raise ValueError(f"fraction: expected a float in (0, 1], got {fraction!r}")
    curve = detection_curve(scores, flagged)
    return _interpolated_found(curve, fraction * scores.shape[0]) / curve.n_flagged
