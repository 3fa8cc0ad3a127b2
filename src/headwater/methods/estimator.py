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
from typing import Any, ClassVar, Self

from torch import Tensor

from headwater.data import DataLike

__all__ = ["Estimator", "check_top_k", "top_k_of"]


def check_top_k(k: Any, n_train: int | None = None) -> int:
    """Validate a ``top_k``: a positive integer, at most ``n_train`` when given."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"top_k: must be a positive integer, got {k!r}")
    if n_train is not None and k > n_train:
        raise ValueError(f"top_k: asked for {k} but there are only {n_train} training examples")
    return k


def top_k_of(values: Tensor, k: int, *, largest: bool = True) -> tuple[Tensor, Tensor]:
    """``(values, indices)`` ``[n_query, k]`` of the ``k`` largest (smallest) of a full score matrix."""
    check_top_k(k, values.shape[1])
    top = values.topk(k, dim=1, largest=largest)
    return top.values, top.indices


class Estimator(ABC):
    """Scores of training examples for queries, ``[n_query, n_train]``.

    Subclasses implement :meth:`scores` and :meth:`settings`; :meth:`top_k` defaults
    to the top of the full matrix (estimators that stream override it), and
    :meth:`self_influence` raises unless overridden.
    """

    method: ClassVar[str]
    """The name ``headwater.influence(method=...)`` knows it by."""

    def fit(self, train: DataLike) -> Self:
        """Prepare what depends on the training data only; returns ``self``."""
        return self

    @abstractmethod
    def scores(self, query: DataLike, train: DataLike) -> Tensor:
        """All scores ``[n_query, n_train]``."""

    def top_k(self, query: DataLike, train: DataLike, k: int, *, largest: bool = True) -> tuple[Tensor, Tensor]:
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

    def attribute(self, query: DataLike, train: DataLike, *, top_k: int | None = None,
                  self_influence: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(values, indices, self_influence)``: :meth:`scores` (``indices`` ``None``) or,
        with ``top_k``, :meth:`top_k`; with ``self_influence``, also :meth:`self_influence`
        (estimators that can take both from one pass over the training data override this)."""
        si = self.self_influence(train) if self_influence else None
        if top_k is None:
            return self.scores(query, train), None, si
        return (*self.top_k(query, train, top_k), si)
