"""The one-call API: ``headwater.influence(model, train, query, ...)``."""

from __future__ import annotations

from typing import Any

from torch import nn

from headwater.curvature import CURVATURES
from headwater.curvature.base import check_damping
from headwater.data import DataLike, iter_batches
from headwater.methods.influence import InfluenceFunction
from headwater.methods.scoring import Scores
from headwater.progress import ProgressFn
from headwater.task import Task, default_task

__all__ = ["influence"]

_METHODS = ("influence",)


def influence(
    model: nn.Module,
    train: DataLike,
    query: DataLike,
    *,
    task: Task | None = None,
    method: str = "influence",
    curvature: str = "ekfac",
    damping: float | None = None,
    projection: int | None = None,
    top_k: int | None = None,
    kind: str = "ggn",
    self_influence: bool = False,
    chunk_size: int = 64,
    query_chunk: int = 256,
    curvature_options: dict[str, Any] | None = None,
    progress: ProgressFn | None = None,
) -> Scores:
    """Scores of every training example for every query.

    ``score[q, i] = ∇m(z_q)ᵀ (M + λI)⁻¹ ∇ℓ(z_i)``; removing example ``i`` changes
    query ``q``'s measurement by about ``+score[q, i]/n`` (positive = helpful with
    the loss as measurement).

    Args:
        model: the trained model (never modified).
        train, query: ``(inputs, targets)`` tensors, a Dataset or a DataLoader.
        task: default: classification (cross-entropy) for integer targets,
            regression (squared error) for float targets.
        method: the estimator; ``"influence"``.
        curvature: a name in ``headwater.curvature.CURVATURES`` (``"exact"``, ...).
        damping: λ; ``None`` lets the curvature pick a default relative to its scale.
        projection: reserved for random projections of gradients (``None``).
        top_k: return the ``k`` largest scores per query (indices and values).
        kind: the matrix: ``"ggn"`` (default), ``"hessian"`` or ``"ef"``.
        self_influence: also compute ``∇ℓ(z_i)ᵀ(M + λI)⁻¹∇ℓ(z_i)`` for every ``i``.
        chunk_size, query_chunk: tile sizes (results do not depend on them).
        curvature_options: extra constructor arguments of the curvature class.
        progress: optional ``progress(stage, done, total)`` callback.

    Returns:
        :class:`~headwater.methods.scoring.Scores`.

    Raises:
        ValueError / TypeError naming the argument for bad input.
    """
    if method not in _METHODS:
        raise ValueError(f"method: expected one of {list(_METHODS)}, got {method!r}")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature: expected one of {sorted(CURVATURES)}, got {curvature!r}")
    damping = check_damping(damping)
    if projection is not None:
        raise ValueError(f"projection: gradient projection is not available for method={method!r}; pass None")
    if task is None:
        _, targets = next(iter_batches(train, 1, "train"))
        task = default_task(targets)
    curv = CURVATURES[curvature](kind=kind, damping=damping, **(curvature_options or {}))
    estimator = InfluenceFunction(model, task, curv, chunk_size=chunk_size, query_chunk=query_chunk,
                                  progress=progress).fit(train)
    settings = {**estimator.settings(), "top_k": top_k}
    si = estimator.self_influence(train) if self_influence else None
    if top_k is not None:
        values, indices = estimator.top_k(query, train, top_k)
        return Scores(values, indices, si, settings)
    return Scores(estimator.scores(query, train), None, si, settings)
