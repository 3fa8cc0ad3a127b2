"""The one-call API: ``headwater.influence(model, train, query, ...)``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

from torch import nn

from headwater.bars import as_progress
from headwater.data import DataLike, iter_batches
from headwater.gradients.projection import KroneckerProjection, RandomProjection
from headwater.methods.registry import METHODS, AttributionSettings, Inputs, check_inputs
from headwater.methods.scoring import Scores, check_scores
from headwater.methods.tracin import Checkpoint
from headwater.progress import ProgressFn
from headwater.task import Task, check_model, check_task, default_task
from headwater.train.recorder import RunRecord
from headwater.train.sgd import Trajectory

__all__ = ["METHODS", "AttributionSettings", "influence"]


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
    method_options: dict[str, Any] | None = None,
    checkpoints: Sequence[Checkpoint] | None = None,
    trajectory: Trajectory | None = None,
    run: RunRecord | None = None,
    renormalize: bool = False,
    progress: bool | ProgressFn | None = True,
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
            ``checkpoints`` or ``run``; Pruthi et al. 2020), ``"hydra"`` (needs ``trajectory``;
            Chen et al. 2021) or ``"metagradient"`` (needs ``run``; exact replay of the
            recorded run, Ilyas & Engstrom 2025).
        curvature: a name in ``headwater.curvature.CURVATURES``, or ``None``/``"auto"`` (default):
            the dense matrix solved by Cholesky when it fits the time and memory budget,
            else ``"ekfac"`` (:func:`~headwater.methods.auto.choose_curvature`; the choice
            and its reason go to ``progress`` as one stage and into ``settings``). With
            ``projection``: ``"exact"`` (the only choice).
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
        method_options: extra constructor arguments of the method's class, for
            ``method="metagradient"``: those of
            :class:`~headwater.methods.metagradient.Metagradient` (``hessian_free``,
            ``normalization``: the counterfactual of a zero weight, ``query_block``, ``dtype``).
        checkpoints: TracIn's checkpoints (:class:`~headwater.methods.tracin.Checkpoint`).
        run: the metagradient's recorded run (:class:`~headwater.train.recorder.Recorder`);
            with ``method="tracin"``, its checkpoints are TracIn's
            (:func:`~headwater.methods.tracin.run_checkpoints`).
        trajectory: HYDRA's recorded run (:func:`headwater.train.sgd.train_sgd`).
        renormalize: TracIn with per-checkpoint unit gradients (Hammoudeh & Lowd 2022).
        progress: ``True`` (default) shows a tqdm bar with ETA for every step that runs
            over a second (gradients, curvature fits, damping probes, CG/LiSSA
            iterations, scoring), as Kronfluence does; ``False`` is silent; a callable
            ``progress(stage, done, total)`` receives the counts instead
            (:class:`headwater.bars.ProgressBars` is the tqdm one).
        store: base path of resumable state for ``method="influence"``: the fitted
            curvature (with ``projection``: the projected training gradients, by chunk,
            and the projected curvature) is saved there, and a later call with the same
            settings, model and training data loads it instead of refitting; a store of
            anything else raises ``headwater.store.StoreMismatchError``; a damaged store is
            recomputed after one warning line (``Scores.settings["store"]`` says what was
            loaded, resumed or recomputed). For ``method="metagradient"``: the reverse
            pass's adjoints, saved after every segment, so a killed pass resumes.
        read_only_store: with ``store``, raise ``headwater.errors.StoreError`` for a damaged
            store instead of recomputing it (and for a missing fitted curvature).

    Returns:
        :class:`~headwater.methods.scoring.Scores`.

    Raises:
        ValueError / TypeError naming the argument for bad input (the rules are those of
        :class:`~headwater.methods.registry.AttributionSettings`; an option, or one of
        ``checkpoints``, ``trajectory`` and ``run``, that the method does not use is refused).
    """
    settings = AttributionSettings(
        method=method,
        curvature=curvature,
        damping=damping,
        projection=projection,
        top_k=top_k,
        kind=kind,
        self_influence=self_influence,
        chunk_size=chunk_size,
        query_chunk=query_chunk,
        query_batch=query_batch,
        curvature_options=curvature_options,
        method_options=method_options,
        renormalize=renormalize,
        store=store,
        read_only_store=read_only_store,
    )
    inputs = Inputs(
        checkpoints=checkpoints, trajectory=trajectory, run=run, progress=as_progress(progress)
    )
    check_inputs(method, inputs)
    check_model(model)
    if task is None:
        _, targets = next(iter_batches(train, 1, "train"))
        task = default_task(
            targets,
            encoder_decoder=bool(
                getattr(getattr(model, "config", None), "is_encoder_decoder", False)
            ),
        )
    else:
        check_task(task)
    estimator = METHODS[method].build(model, task, settings, inputs, train)
    result = estimator.attribute(query, train, top_k=top_k, self_influence=self_influence)
    return check_scores(
        dataclasses.replace(result, settings={**estimator.settings(), "top_k": top_k})
    )
