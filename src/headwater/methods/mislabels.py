"""Mislabel detection by self-influence (Koh & Liang 2017, §5.4; Pruthi et al. 2020, §4.1).

A training example's self-influence is its score on itself,

    s_i = ∇ℓ(z_i)ᵀ (M + λI)⁻¹ ∇ℓ(z_i)        (influence function)
    s_i = Σ_c η_c s_c ‖∇ℓ(z_i; θ_c)‖²        (TracIn)

and ``s_i / n`` approximates how much removing ``z_i`` would raise its *own* loss.
An example the rest of the data does not support — typically a wrong label — is
fit only because it is in the training set, so its self-influence is large. With
a positive semi-definite curvature (GGN, damping > 0) every ``s_i`` is ≥ 0; larger
is more suspicious. Checking examples in decreasing ``s_i`` order finds flipped
labels far faster than random checking (evaluate with
:mod:`headwater.evaluate.detection`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from headwater.data import DataLike
from headwater.methods.influence import InfluenceFunction
from headwater.methods.tracin import TracIn

__all__ = ["MislabelRanking", "detect_mislabels", "mislabel_ranking"]


@dataclass(frozen=True)
class MislabelRanking:
    """Training examples ordered by suspicion.

    Attributes:
        order: ``[n_train]`` training indices, most suspicious (largest self-influence) first.
        self_influence: ``[n_train]`` the score of each example on itself, in index order.
    """

    order: Tensor
    self_influence: Tensor

    def top(self, k: int) -> Tensor:
        """The ``k`` most suspicious training indices ``[k]``."""
        n = self.order.numel()
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ValueError(f"k: expected an integer in [1, {n}], got {k!r}")
        return self.order[:k]

    def top_fraction(self, fraction: float) -> Tensor:
        """The most suspicious ``ceil(fraction · n)`` training indices (what to check first)."""
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not math.isfinite(fraction)
            or not 0 < fraction <= 1
        ):
            raise ValueError(f"fraction: expected a float in (0, 1], got {fraction!r}")
        return self.order[: max(1, math.ceil(fraction * self.order.numel()))]


def mislabel_ranking(self_influence: Tensor) -> MislabelRanking:
    """Order training examples by decreasing self-influence (ties by index).

    Args:
        self_influence: ``[n_train]`` self-influence per example.

    Raises:
        ValueError: naming ``self_influence`` if it is not 1-D, empty or not finite.
    """
    if (
        not isinstance(self_influence, Tensor)
        or self_influence.dim() != 1
        or self_influence.numel() == 0
    ):
        raise ValueError(
            f"self_influence: expected a non-empty 1-D tensor [n_train], "
            f"got {getattr(self_influence, 'shape', type(self_influence))}"
        )
    if not torch.isfinite(self_influence).all():
        raise ValueError("self_influence: contains NaN/inf")
    order = torch.argsort(self_influence, descending=True, stable=True)
    return MislabelRanking(order=order, self_influence=self_influence)


def detect_mislabels(estimator: InfluenceFunction | TracIn, train: DataLike) -> MislabelRanking:
    """Rank the training set by self-influence to find mislabeled examples.

    Args:
        estimator: a fitted :class:`~headwater.methods.influence.InfluenceFunction`
            or a :class:`~headwater.methods.tracin.TracIn` without renormalisation
            (renormalised gradients all have norm 1, so every self-influence would be equal).
        train: the training data the estimator describes, with its (possibly wrong) labels.

    Returns:
        :class:`MislabelRanking`.

    Raises:
        TypeError / ValueError naming ``estimator``.
    """
    if isinstance(estimator, TracIn):
        if estimator.renormalize:
            raise ValueError(
                "estimator: TracIn with renormalize=True gives every example the same "
                "self-influence; use renormalize=False for mislabel detection"
            )
    elif not isinstance(estimator, InfluenceFunction):
        raise TypeError(
            f"estimator: expected an InfluenceFunction or TracIn, got {type(estimator).__name__}"
        )
    return mislabel_ranking(estimator.self_influence(train))
