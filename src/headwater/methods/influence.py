"""Influence functions (Koh & Liang 2017) on any curvature approximation."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from headwater.curvature.base import Curvature
from headwater.curvature.kfac import KroneckerCurvature
from headwater.data import DataLike, num_examples
from headwater.gradients.per_example import Objective, per_example_gradients
from headwater.methods.factored import factored_scores
from headwater.methods.scoring import pairwise, pairwise_top_k
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = ["InfluenceFunction"]


class InfluenceFunction:
    """``score[q, i] = ∇m(z_q)ᵀ (M + λI)⁻¹ ∇ℓ(z_i)``.

    ``M`` is the curvature of the *mean* training objective. Removing training
    example ``i`` changes query ``q``'s measurement by about ``+score[q, i] / n``:
    with the loss as measurement, a positive score marks a proponent (removing it
    raises the query's loss), a negative one an opponent.
    (Koh & Liang 2017, "Understanding Black-box Predictions via Influence Functions".)

    Args:
        model: the trained model (never modified).
        task: loss, measurement and analysed parameters.
        curvature: an unfitted or fitted :class:`~headwater.curvature.base.Curvature`.
        chunk_size: examples per per-example-gradient step.
        query_chunk: query rows per scoring tile.
        progress: optional ``progress(stage, done, total)`` callback.
    """

    def __init__(self, model: nn.Module, task: Task, curvature: Curvature, *, chunk_size: int = 64,
                 query_chunk: int = 256, progress: ProgressFn | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(task, Task):
            raise TypeError(f"task: expected a headwater Task, got {type(task).__name__}")
        if not isinstance(curvature, Curvature):
            raise TypeError(f"curvature: expected a headwater Curvature, got {type(curvature).__name__}")
        for arg, value in (("chunk_size", chunk_size), ("query_chunk", query_chunk)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{arg}: must be a positive integer, got {value!r}")
        self.model, self.task, self.curvature = model, task, curvature
        self.chunk_size, self.query_chunk, self.progress = chunk_size, query_chunk, progress

    def fit(self, train: DataLike) -> InfluenceFunction:
        """Fit the curvature on the training data."""
        self.curvature.fit(self.model, self.task, train, progress=self.progress)
        return self

    def _grads(self, data: DataLike, objective: Objective, name: str):
        return per_example_gradients(self.model, self.task, data, objective=objective,
                                     chunk_size=self.chunk_size, name=name, progress=self.progress)

    def preconditioned_queries(self, query: DataLike) -> Tensor:
        """``(M + λI)⁻¹ ∇m(z_q)`` for every query, ``[n_query, P]``, solved ``query_chunk``
        rows at a time (an iterative solver's passes over the data serve the whole block)."""
        grads = torch.cat(list(self._grads(query, Objective.MEASUREMENT, "query")))  # [n_query, P]
        return torch.cat([self.curvature.solve(grads[i : i + self.query_chunk])
                          for i in range(0, grads.shape[0], self.query_chunk)])

    def scores(self, query: DataLike, train: DataLike) -> Tensor:
        """All scores ``[n_query, n_train]``. With K-FAC/EK-FAC they are computed module by
        module (:func:`~headwater.methods.factored.factored_scores`), never flattening the
        model; the numbers are the same."""
        if isinstance(self.curvature, KroneckerCurvature):
            return factored_scores(self.model, self.task, self.curvature, query, train,
                                   chunk_size=self.chunk_size, progress=self.progress)
        left = self.preconditioned_queries(query)
        return pairwise(left, self._grads(train, Objective.TRAIN, "train"), num_examples(train, "train"),
                        query_chunk=self.query_chunk)

    def top_k(self, query: DataLike, train: DataLike, k: int, *, largest: bool = True) -> tuple[Tensor, Tensor]:
        """The ``k`` largest (proponents) or smallest (opponents) scores per query:
        ``(values, indices)``, each ``[n_query, k]``, streamed over the training data."""
        left = self.preconditioned_queries(query)
        return pairwise_top_k(left, self._grads(train, Objective.TRAIN, "train"), k, largest=largest,
                              query_chunk=self.query_chunk)

    def self_influence(self, train: DataLike) -> Tensor:
        """``∇ℓ(z_i)ᵀ (M + λI)⁻¹ ∇ℓ(z_i)`` for every training example, ``[n_train]``
        (large values flag unusual or mislabeled examples)."""
        out, n, done = [], num_examples(train, "train"), 0
        for g in self._grads(train, Objective.TRAIN, "train"):
            out.append((self.curvature.solve(g) * g).sum(dim=1))
            done += g.shape[0]
            report(self.progress, "self-influence", done, n)
        return torch.cat(out)

    def settings(self) -> dict[str, Any]:
        return {"method": "influence", **self.curvature.settings(), "fitted_damping": self.curvature.fitted_damping,
                "task": self.task.to_dict(), "chunk_size": self.chunk_size}
