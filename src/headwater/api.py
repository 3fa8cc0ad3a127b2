"""The one-call API: ``headwater.influence(model, train, query, ...)``."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from headwater.curvature import CURVATURES
from headwater.curvature.base import check_damping
from headwater.data import DataLike, iter_batches
from headwater.errors import check_option_names
from headwater.gradients.projection import KroneckerProjection, RandomProjection
from headwater.methods.hydra import Hydra
from headwater.methods.influence import InfluenceFunction
from headwater.methods.projected import ProjectedInfluence
from headwater.methods.scoring import Scores, check_scores
from headwater.methods.tracin import Checkpoint, TracIn
from headwater.progress import ProgressFn
from headwater.task import Task, default_task
from headwater.train.sgd import Trajectory

__all__ = ["METHODS", "check_curvature_options", "influence"]

METHODS = ("influence", "tracin", "hydra")
"""Estimators ``headwater.influence(method=...)`` accepts."""


def check_curvature_options(curvature: str | None, options: dict[str, Any] | None, *, projected: bool) -> None:
    """``ConfigError`` naming an option the curvature class (or, ``projected``, the projected
    estimator) does not take, listing the valid ones; ``curvature`` is a known name."""
    if projected:
        reserved = ("model", "task", "projection", "kind", "damping", "chunk_size", "query_chunk", "progress")
        check_option_names(ProjectedInfluence, options or {}, what="curvature_options", reserved=reserved)
    else:
        check_option_names(CURVATURES[curvature or "ekfac"], options or {}, what="curvature_options",
                           reserved=("kind", "damping"))


def influence(
    model: nn.Module,
    train: DataLike,
    query: DataLike,
    *,
    task: Task | None = None,
    method: str = "influence",
    curvature: str | None = None,
    damping: float | None = None,
    projection: int | RandomProjection | KroneckerProjection | None = None,
    top_k: int | None = None,
    kind: str = "ggn",
    self_influence: bool = False,
    chunk_size: int = 64,
    query_chunk: int = 256,
    query_batch: int | None = None,
    curvature_options: dict[str, Any] | None = None,
    checkpoints: Sequence[Checkpoint] | None = None,
    trajectory: Trajectory | None = None,
    renormalize: bool = False,
    progress: ProgressFn | None = None,
    store: str | os.PathLike | None = None,
    read_only_store: bool = False,
) -> Scores:
    """Scores of every training example for every query.

    Every method follows one convention: removing example ``i`` changes query ``q``'s
    measurement by about ``+score[q, i]/n`` (positive = helpful with the loss as
    measurement). For ``method="influence"``, ``score[q, i] = ∇m(z_q)ᵀ (M + λI)⁻¹ ∇ℓ(z_i)``.

    Args:
        model: the trained model (never modified).
        train, query: ``(inputs, targets)`` tensors, a Dataset or a DataLoader.
        task: default: classification (cross-entropy) for integer targets,
            regression (squared error) for float targets.
        method: ``"influence"`` (Koh & Liang 2017), ``"tracin"`` (needs
            ``checkpoints``; Pruthi et al. 2020) or ``"hydra"`` (needs ``trajectory``;
            Chen et al. 2021).
        curvature: a name in ``headwater.curvature.CURVATURES``; default ``"ekfac"``, or
            ``"exact"`` (the only choice) with ``projection``.
        damping: λ; ``None`` lets the curvature pick a default relative to its scale.
        projection: influence on randomly projected gradients
            (:class:`~headwater.methods.projected.ProjectedInfluence`): ``k`` or a
            :class:`~headwater.gradients.projection.RandomProjection` (flat), or a
            :class:`~headwater.gradients.projection.KroneckerProjection` (per layer, never
            forms a gradient); ``kind`` ``"ggn"`` or ``"ef"``; ``curvature_options`` go to
            it (e.g. ``seed``, ``store``, ``ggn_estimator``).
        top_k: return the ``k`` largest scores per query (indices and values).
        kind: the matrix: ``"ggn"`` (default), ``"hessian"`` or ``"ef"``.
        self_influence: also compute each training example's score on itself
            (influence and TracIn).
        chunk_size, query_chunk: tile sizes (results do not depend on them).
        query_batch: with ``method="influence"``, hold the preconditioned gradients of this
            many queries at a time (memory ``query_batch × P`` instead of ``n_query × P``;
            one more pass over the training gradients per batch; same numbers).
        curvature_options: extra constructor arguments of the curvature class.
        checkpoints: TracIn's checkpoints (:class:`~headwater.methods.tracin.Checkpoint`).
        trajectory: HYDRA's recorded run (:func:`headwater.train.sgd.train_sgd`).
        renormalize: TracIn with per-checkpoint unit gradients (Hammoudeh & Lowd 2022).
        progress: optional ``progress(stage, done, total)`` callback.
        store: base path of resumable state for ``method="influence"``: the fitted
            curvature (with ``projection``: the projected training gradients, by chunk,
            and the projected curvature) is saved there, and a later call with the same
            settings, model and training data loads it instead of refitting; a store of
            anything else raises ``headwater.store.StoreMismatchError``; a damaged store is
            recomputed after one warning line (``Scores.settings["store"]`` says what was
            loaded, resumed or recomputed).
        read_only_store: with ``store``, raise ``headwater.errors.StoreError`` for a damaged
            store instead of recomputing it (and for a missing fitted curvature).

    Returns:
        :class:`~headwater.methods.scoring.Scores`.

    Raises:
        ValueError / TypeError naming the argument for bad input.
    """
    if method not in METHODS:
        raise ValueError(f"method: expected one of {list(METHODS)}, got {method!r}")
    damping = check_damping(damping)
    if projection is not None:
        if method != "influence":
            raise ValueError(f"projection: gradient projection is available for method='influence' only, "
                             f"not {method!r}")
        if curvature not in (None, "exact"):
            raise ValueError(f"curvature: with projection the projected curvature is dense (k x k); pass "
                             f"curvature='exact' or None, not {curvature!r}")
    if query_batch is not None and (method != "influence" or projection is not None):
        raise ValueError("query_batch: batches the preconditioned queries of method='influence' without "
                         f"projection (method={method!r}, projection={'set' if projection is not None else None})")
    if store is not None and method != "influence":
        raise ValueError(f"store: resumable state is kept for method='influence' only, not {method!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k <= 0):
        raise ValueError(f"top_k: must be a positive integer, got {top_k!r}")
    if task is None:
        _, targets = next(iter_batches(train, 1, "train"))
        task = default_task(targets)
    if method == "influence" and projection is not None:
        check_curvature_options(None, curvature_options, projected=True)
        options = dict(curvature_options or {})
        if store is not None:
            if options.get("store") not in (None, store):
                raise ValueError("store: given twice (also in curvature_options) with different paths")
            options["store"] = store
        if read_only_store:
            options["read_only"] = True
        estimator: Any = ProjectedInfluence(model, task, projection, kind=kind, damping=damping,
                                            chunk_size=chunk_size, query_chunk=query_chunk, progress=progress,
                                            **options).fit(train)
    elif method == "influence":
        curvature = "ekfac" if curvature is None else curvature
        if curvature not in CURVATURES:
            raise ValueError(f"curvature: expected one of {sorted(CURVATURES)}, got {curvature!r}")
        check_curvature_options(curvature, curvature_options, projected=False)
        curv = CURVATURES[curvature](kind=kind, damping=damping, **(curvature_options or {}))
        estimator = InfluenceFunction(model, task, curv, chunk_size=chunk_size, query_chunk=query_chunk,
                                      query_batch=query_batch, progress=progress,
                                      ).fit(train, store=store, read_only=read_only_store)
    elif method == "tracin":
        if checkpoints is None:
            raise ValueError("checkpoints: method='tracin' needs the training checkpoints")
        estimator = TracIn(model, task, checkpoints, renormalize=renormalize, chunk_size=chunk_size,
                           query_chunk=query_chunk, progress=progress)
    else:
        if trajectory is None:
            raise ValueError("trajectory: method='hydra' needs a recorded run (headwater.train.train_sgd)")
        if self_influence:
            raise ValueError("self_influence: not defined for method='hydra'")
        estimator = Hydra(model, task, trajectory, progress=progress)
    settings = {**estimator.settings(), "top_k": top_k}
    if isinstance(estimator, InfluenceFunction):  # scores and self-influence from one training pass
        values, indices, si = estimator.attribute(query, train, top_k=top_k, self_influence=self_influence)
        return check_scores(Scores(values, indices, si, settings))
    si = estimator.self_influence(train) if self_influence else None
    if top_k is not None and method == "influence":  # streamed: never holds n_query x n_train
        return check_scores(Scores(*estimator.top_k(query, train, top_k), si, settings))
    values = estimator.scores(query, train)
    if top_k is not None:
        if top_k > values.shape[1]:
            raise ValueError(f"top_k: asked for {top_k} but there are only {values.shape[1]} training examples")
        top = values.topk(top_k, dim=1)
        return check_scores(Scores(top.values, top.indices, si, settings))
    return check_scores(Scores(values, None, si, settings))
