"""The one protocol every pair-scoring estimator implements.

An :class:`Estimator` is built from a model, a task and its own settings; ``fit``
prepares whatever depends on the training data only (a curvature, projected
training features; a no-op for TracIn and HYDRA); ``scores``, ``top_k`` and
``self_influence`` read it. Every estimator follows headwater's one convention:
removing training example ``i`` changes query ``q``'s measurement by about
``+score[q, i] / n`` (positive = proponent with the loss as measurement).
:func:`headwater.influence` dispatches over this protocol only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar, TypeVar

from torch import Tensor

from headwater.data import DataLike
from headwater.methods.scoring import Scores, check_top_k, top_k_of

__all__ = ["Estimator", "check_top_k", "top_k_of"]  # the checks live in scoring, beside the loop


_Self = TypeVar("_Self", bound="Estimator")


class Estimator(ABC):
    """Scores of training examples for queries, ``[n_query, n_train]``.

    Subclasses implement :meth:`scores` and :meth:`settings`; :meth:`top_k` defaults
    to the top of the full matrix (estimators that stream override it), and
    :meth:`self_influence` raises unless overridden.
    """

    method: ClassVar[str]
    """The name ``headwater.influence(method=...)`` knows it by."""

    def fit(self: _Self, train: DataLike) -> _Self:
        """Prepare what depends on the training data only; returns ``self``."""
        return self

    @abstractmethod
    def scores(self, query: DataLike, train: DataLike) -> Tensor:
        """All scores ``[n_query, n_train]``."""

    def top_k(
        self, query: DataLike, train: DataLike, k: int, *, largest: bool = True
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` largest (proponents) or smallest (opponents) scores per query:
        ``(values, indices)``, each ``[n_query, k]``."""
        check_top_k(k)
        return top_k_of(self.scores(query, train), k, largest=largest)

    def self_influence(self, train: DataLike) -> Tensor:
        """Each training example's score on itself, ``[n_train]``."""
        raise ValueError(f"self_influence: not defined for method={self.method!r}")

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """Everything needed to reproduce the scores (JSON-friendly)."""

    def extremes(
        self, query: DataLike, train: DataLike, k: int
    ) -> tuple[tuple[Tensor, Tensor], ...]:
        """The proponents (``k`` largest scores) and the opponents (``k`` smallest), each
        ``(values, indices)`` ``[n_query, k]``; by default from the full matrix (estimators
        that stream override this with one pass)."""
        values = self.scores(query, train)
        return top_k_of(values, k), top_k_of(values, k, largest=False)

    def attribute(
        self,
        query: DataLike,
        train: DataLike,
        *,
        top_k: int | None = None,
        self_influence: bool = False,
    ) -> Scores:
        """:meth:`scores` or, with ``top_k``, the proponents and opponents (:meth:`extremes`);
        with ``self_influence``, also :meth:`self_influence`; as a
        :class:`~headwater.methods.scoring.Scores` without settings (estimators that can take
        both from one pass over the training data override this)."""
        si = self.self_influence(train) if self_influence else None
        if top_k is None:
            return Scores(self.scores(query, train), self_influence=si)
        (values, indices), (low, low_indices) = self.extremes(query, train, check_top_k(top_k))
        return Scores(values, indices, si, opponent_values=low, opponent_indices=low_indices)
