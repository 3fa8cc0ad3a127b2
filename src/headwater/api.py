"""The one-call API: ``headwater.influence(model, train, query, ...)``."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from headwater.bars import as_progress
from headwater.data import Batch, DataLike, call_model, iter_batches, num_examples
from headwater.gradients.functional import evaluation_mode, prepare_batch
from headwater.gradients.per_example import Objective, check_batch
from headwater.gradients.projection import KroneckerProjection, RandomProjection
from headwater.methods.registry import METHODS, AttributionSettings, Inputs, check_inputs
from headwater.methods.scoring import Scores, check_scores
from headwater.methods.tracin import Checkpoint
from headwater.progress import ProgressFn
from headwater.task import Task, check_model, check_task, default_task, model_output
from headwater.train.recorder import RunRecord, WithIndices
from headwater.train.sgd import Trajectory

__all__ = ["CHECKED_EXAMPLES", "METHODS", "AttributionSettings", "check_data", "influence"]


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
        train, query: ``(inputs, targets)`` tensors, a dict batch with ``"labels"``, a
            Dataset or a DataLoader that yields every example in order, in batches (one that
            shuffles, drops a last batch or has ``batch_size=None`` is refused, as is a
            dataset wrapped by :func:`headwater.train.with_indices`). Their first examples go
            through the model and task before any step (:func:`check_data`).
        task: default: classification (cross-entropy) for integer targets ``[n]``, a
            language model's token loss for integer targets ``[n, T]`` when the model's
            outputs are ``[B, T, V]``, regression (squared error) for float targets.
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
            ``normalization``: the counterfactual of a zero weight, ``query_block``, ``dtype``:
            a torch.dtype or its name, e.g. ``"float64"``).
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
    for data, name in ((train, "train"), (query, "query")):
        _check_not_indexed(data, name)
    task = check_task(task) if task is not None else _default_task(model, train)
    check_data(model, task, train, query)
    estimator = METHODS[method].build(model, task, settings, inputs, train)
    result = estimator.attribute(query, train, top_k=top_k, self_influence=self_influence)
    return check_scores(
        dataclasses.replace(result, settings={**estimator.settings(), "top_k": top_k})
    )


CHECKED_EXAMPLES = 2
"""Examples of ``train`` and ``query`` evaluated before any long step (:func:`check_data`)."""


def check_data(model: nn.Module, task: Task, train: DataLike, query: DataLike) -> None:
    """Evaluate ``task`` on the first :data:`CHECKED_EXAMPLES` examples of ``train`` (the
    training loss) and ``query`` (the measurement), so that data which does not fit the model
    or task raises the same :class:`~headwater.errors.InputError` naming the set whatever the
    method and curvature, before any of them runs the model (the automatic curvature choice
    included; :func:`~headwater.gradients.per_example.check_batch`)."""
    like = next(iter(task.parameters(model).values()))
    for data, name, objective in (
        (train, "train", Objective.TRAIN),
        (query, "query", Objective.MEASUREMENT),
    ):
        batch = prepare_batch(next(iter_batches(data, CHECKED_EXAMPLES, name)), like)
        check_batch(model, task, batch, name, objective)


def _default_task(model: nn.Module, train: DataLike) -> Task:
    """The task ``train``'s targets imply (:func:`~headwater.task.default_task`), told by the
    model's output when integer targets ``[B, k]`` could be a classifier's labels or token ids."""
    batch = next(iter_batches(train, CHECKED_EXAMPLES, "train"))
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    output_shape = None
    if batch[1].dim() == 2 and not encoder_decoder:
        output_shape = _output_shape(model, batch)
    return default_task(
        batch[1],
        encoder_decoder=encoder_decoder,
        output_shape=output_shape,
        n=num_examples(train, "train"),
    )


def _output_shape(model: nn.Module, batch: Batch) -> tuple[int, ...] | None:
    """The shape of the model's output on ``batch`` (``None`` if the model cannot be called on
    it as is: :func:`check_data` then names the problem with the task chosen)."""
    like = next(model.parameters(), None)
    try:
        x, _ = prepare_batch(batch, like) if like is not None else batch
        with torch.no_grad(), evaluation_mode(model):
            return tuple(model_output(call_model(model, x)).shape)
    except (RuntimeError, IndexError, TypeError, ValueError):
        return None


def _check_not_indexed(data: DataLike, name: str) -> None:
    """Refuse a dataset wrapped by :func:`headwater.train.with_indices` (or a loader over one):
    its items are ``(item, index)`` pairs for the training loop, not examples."""
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(dataset, WithIndices):
        raise TypeError(
            f"{name}: a dataset wrapped by headwater.train.with_indices yields (item, index) "
            "pairs for the training loop; pass the dataset itself (with_indices(ds).dataset)"
        )
