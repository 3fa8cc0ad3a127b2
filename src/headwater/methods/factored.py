"""Influence with K-FAC/EK-FAC computed module by module, never flattening the model.

For each block ``m`` (a supported layer, see :mod:`headwater.curvature.kfac_blocks`)

    score_m[q, i] = ⟨(M_m + (wd + λ_m) I)⁻¹ G_m(z_q),  G_m(z_i)⟩

with ``G_m(z)`` the per-example gradient of the block as a matrix ``[out, in (+1)]``
(of the query measurement for ``q``, of the training loss for ``i``). Because K-FAC
and EK-FAC are block-diagonal over modules, ``Σ_m score_m`` equals
:class:`~headwater.methods.influence.InfluenceFunction`'s score with the same
curvature: removing example ``i`` changes query ``q``'s measurement by about
``+score[q, i] / n`` (positive = proponent with the loss as measurement; Koh & Liang
2017; Grosse et al. 2023, "Studying Large Language Model Generalization with
Influence Functions", for the per-layer breakdown).

Per-example block gradients come from one batched forward/backward with hooks
(``G = Σ_t s_t ã_tᵀ``), not from ``vmap``: each query gradient is preconditioned once
per module, then dotted with raw training gradients chunk by chunk. Memory is
``n_query × P`` for the preconditioned queries plus one chunk of block gradients.
Like every per-example gradient in headwater, this needs examples that do not
interact in the forward pass (the model runs in eval mode).

Under ``torch.distributed`` each rank computes the columns of its shard of the
training data (:func:`~headwater.distributed.shard`) and the columns are gathered in
global order, so every rank returns the whole ``[n_query, n_train]`` (collective).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn

from headwater.curvature.kfac import KroneckerCurvature
from headwater.curvature.kfac_blocks import Block, capture
from headwater.data import DataLike, iter_batches, num_examples
from headwater.distributed import gather_columns, shard, shard_range
from headwater.errors import check_finite_rows
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import bind, detached, evaluation_mode, prepare_batch
from headwater.gradients.per_example import Objective, check_batch, check_values
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = ["factored_scores", "module_factors", "module_gradients", "module_scores"]


def module_gradients(model: nn.Module, task: Task, blocks: tuple[Block, ...], data: DataLike, *,
                     objective: Objective | str = Objective.TRAIN, chunk_size: int = 64,
                     name: str = "data", progress: ProgressFn | None = None
                     ) -> Iterator[dict[str, Tensor]]:
    """Yield per-example block gradients ``{module: [chunk, out, width]}``, in order
    (``G = Σ_t s_t ã_tᵀ`` from :func:`module_factors`; same arguments)."""
    for factors in module_factors(model, task, blocks, data, objective=objective, chunk_size=chunk_size,
                                  name=name, progress=progress):
        yield {module: torch.einsum("bto,bti->boi", s, a) for module, (s, a) in factors.items()}


def module_factors(model: nn.Module, task: Task, blocks: tuple[Block, ...], data: DataLike, *,
                   objective: Objective | str = Objective.TRAIN, chunk_size: int = 64,
                   name: str = "data", progress: ProgressFn | None = None
                   ) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Yield each block's output gradients and inputs ``{module: (s [chunk, T, out],
    ã [chunk, T, width])}``, in order: the per-example gradient is ``Σ_t s_t ã_tᵀ``, from
    one batched forward/backward pass with hooks.

    Args:
        model: the model (left unchanged; evaluated in eval mode).
        task: loss, measurement and analysed parameters.
        blocks: from :func:`~headwater.curvature.kfac_blocks.find_blocks` or a fitted
            K-FAC/EK-FAC's ``.blocks``.
        data: an ``(inputs, targets)`` pair, a Dataset or a DataLoader.
        objective: ``"train"`` (training loss) or ``"measurement"``.
        chunk_size: examples per forward/backward; results do not depend on it.
        name: the argument name used in error messages.
        progress: optional ``progress(stage, done, total)`` callback.

    Raises:
        ValueError: for empty data, inputs that do not fit, NaN/inf values.
    """
    objective = Objective(objective)
    params = detached(task.parameters(model))
    ref = next(iter(params.values()))
    value_fn = task.train_loss if objective is Objective.TRAIN else task.measurement
    total, done = num_examples(data, name), 0
    with evaluation_mode(model), torch.enable_grad():
        for batch in iter_batches(data, chunk_size, name):
            x, y = prepare_batch(batch, ref)
            if done == 0:
                check_batch(model, task, (x, y), name, objective)
            live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            with capture(model, blocks) as cap:
                values = value_fn(bind(model, live), (x, y))
            check_values(values, x.shape[0], name, done)
            signals, acts = cap.signals(values.sum()), cap.activations()
            check_finite_rows([*signals.values(), *acts.values()], what="layer gradient", name=name,
                              offset=done)  # the per-example gradients are Σ_t s_t ã_tᵀ
            done += x.shape[0]
            report(progress, f"module gradients ({name})", done, total)
            yield {b.module: (signals[b.module], acts[b.module]) for b in blocks}


def _check(model: nn.Module, task: Task, curvature: KroneckerCurvature) -> None:
    if not isinstance(curvature, KroneckerCurvature):
        raise TypeError(f"curvature: expected a fitted KFAC or EKFAC, got {type(curvature).__name__}")
    curvature._check_fitted()
    if ParamLayout.of(task.parameters(model)) != curvature.layout:
        raise ValueError("curvature: it was fitted on other analysed parameters than task selects "
                         "in model; refit it or pass the matching task")


def _preconditioned_queries(model: nn.Module, task: Task, curvature: KroneckerCurvature,
                            query: DataLike, chunk_size: int, progress: ProgressFn | None
                            ) -> dict[str, Tensor]:
    """``(M_m + (wd + λ_m) I)⁻¹ G_m(z_q)`` per block, ``{module: [n_query, out·width]}``,
    written into preallocated rows (no concatenated copy)."""
    blocks, n_query = curvature.blocks, num_examples(query, "query")
    left: dict[str, Tensor] = {}
    row = 0
    for grads in module_gradients(model, task, blocks, query, objective=Objective.MEASUREMENT,
                                  chunk_size=chunk_size, name="query", progress=progress):
        for module, pre in curvature.solve_blocks(grads).items():
            if module not in left:
                left[module] = pre.new_empty(n_query, pre[0].numel())
            left[module][row : row + pre.shape[0]] = pre.reshape(pre.shape[0], -1)
        row += pre.shape[0]
    return left


def _score_tiles(model: nn.Module, task: Task, curvature: KroneckerCurvature, query: DataLike,
                 train: DataLike, n_local: int, chunk_size: int, progress: ProgressFn | None,
                 self_sink: list[Tensor] | None = None) -> Iterator[tuple[str, int, Tensor]]:
    """``(module, first column, score_m tile [n_query, chunk])`` over this rank's shard
    of the training data (``n_local`` examples; columns counted within the shard).
    With ``self_sink``, each chunk's self-influence ``Σ_m ⟨(M_m + …)⁻¹ G_m, G_m⟩ [chunk]``
    is appended to it from the same gradients."""
    left = _preconditioned_queries(model, task, curvature, query, chunk_size, progress)
    if n_local == 0:
        return
    col = 0
    for grads in module_gradients(model, task, curvature.blocks, shard(train, "train"),
                                  objective=Objective.TRAIN, chunk_size=chunk_size, name="train",
                                  progress=progress):
        if self_sink is not None:
            solved = curvature.solve_blocks(grads)
            self_sink.append(sum((solved[m] * g).sum(dim=(1, 2)) for m, g in grads.items()))
        for module, g in grads.items():  # [B, out, width]
            yield module, col, left[module] @ g.reshape(g.shape[0], -1).T
        col += g.shape[0]


def _shard_size(train: DataLike) -> int:
    start, stop = shard_range(num_examples(train, "train"))
    return stop - start


def _like(model: nn.Module, task: Task) -> Tensor:
    """A tensor with the dtype and device of the scores (those of the analysed parameters)."""
    return next(iter(task.parameters(model).values())).detach()


def module_scores(model: nn.Module, task: Task, curvature: KroneckerCurvature, query: DataLike,
                  train: DataLike, *, chunk_size: int = 64, progress: ProgressFn | None = None
                  ) -> dict[str, Tensor]:
    """Influence per module: ``{module: score_m [n_query, n_train]}`` (see module docs).

    The values sum to the full influence scores
    ``∇m(z_q)ᵀ (M + λI)⁻¹ ∇ℓ(z_i)`` of the block-diagonal curvature.

    Args:
        model: the trained model (never modified).
        task: loss, measurement and analysed parameters (as used to fit ``curvature``).
        curvature: a fitted :class:`~headwater.curvature.kfac.KFAC` or ``EKFAC``.
        query, train: ``(inputs, targets)`` tensors, a Dataset or a DataLoader.
        chunk_size: examples per forward/backward pass.
        progress: optional ``progress(stage, done, total)`` callback.

    Raises:
        TypeError: if ``curvature`` is not a K-FAC/EK-FAC.
        ValueError: if it was fitted on other parameters, or for bad data.
    """
    n_query, n_local = num_examples(query, "query"), _shard_size(train)
    _check(model, task, curvature)
    like = _like(model, task)
    out = {b.module: like.new_zeros(n_query, n_local) for b in curvature.blocks}
    for module, col, tile in _score_tiles(model, task, curvature, query, train, n_local,
                                          chunk_size, progress):
        out[module][:, col : col + tile.shape[1]] = tile
    return {module: gather_columns(block) for module, block in out.items()}


def factored_scores(model: nn.Module, task: Task, curvature: KroneckerCurvature, query: DataLike,
                    train: DataLike, *, chunk_size: int = 64, progress: ProgressFn | None = None,
                    self_sink: list[Tensor] | None = None) -> Tensor:
    """Total influence ``[n_query, n_train]``: the sum over modules of :func:`module_scores`
    (same arguments; same convention as ``InfluenceFunction.scores``), accumulated tile
    by tile without keeping the per-module matrices. With ``self_sink`` (a list), the
    self-influence of this rank's training examples is appended to it chunk by chunk,
    from the same pass over the training gradients."""
    n_query, n_local = num_examples(query, "query"), _shard_size(train)
    _check(model, task, curvature)
    total = _like(model, task).new_zeros(n_query, n_local)
    for _, col, tile in _score_tiles(model, task, curvature, query, train, n_local, chunk_size,
                                     progress, self_sink):
        total[:, col : col + tile.shape[1]] += tile
    return gather_columns(total)
