"""Influence with K-FAC/EK-FAC computed module by module, never flattening the model.

For each block ``m`` (a supported layer, see :mod:`headwater.gradients.layers`)

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
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headwater.curvature.kfac import KroneckerCurvature
from headwater.data import DataLike, iter_batches, num_examples
from headwater.distributed import gather_columns, shard, shard_range
from headwater.errors import check_finite_rows
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import bind, detached, evaluation_mode, prepare_batch
from headwater.gradients.layers import Block, DiagonalPart, capture
from headwater.gradients.per_example import Objective, check_batch, check_values
from headwater.methods.scoring import Features, pairwise
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = [
    "BlockFeatures",
    "check_block_curvature",
    "factored_scores",
    "module_factors",
    "module_gradients",
    "module_scores",
    "preconditioned_blocks",
    "train_blocks",
]


def module_gradients(
    model: nn.Module,
    task: Task,
    blocks: tuple[Block, ...],
    data: DataLike,
    *,
    objective: Objective | str = Objective.TRAIN,
    chunk_size: int = 64,
    name: str = "data",
    progress: ProgressFn | None = None,
) -> Iterator[dict[str, Tensor]]:
    """Yield per-example block gradients ``{module: [chunk, out, width]}``, in order
    (``G = Σ_t s_t ã_tᵀ`` from :func:`module_factors`; same arguments)."""
    for factors in module_factors(
        model,
        task,
        blocks,
        data,
        objective=objective,
        chunk_size=chunk_size,
        name=name,
        progress=progress,
    ):
        yield {module: torch.einsum("bto,bti->boi", s, a) for module, (s, a) in factors.items()}


def module_factors(
    model: nn.Module,
    task: Task,
    blocks: tuple[Block, ...],
    data: DataLike,
    *,
    objective: Objective | str = Objective.TRAIN,
    chunk_size: int = 64,
    name: str = "data",
    progress: ProgressFn | None = None,
) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """Yield each block's output gradients and inputs ``{module: (s [chunk, T, out],
    ã [chunk, T, width])}``, in order: the per-example gradient is ``Σ_t s_t ã_tᵀ``, from
    one batched forward/backward pass with hooks (the diagonal block's, ``[chunk, 1, P_d]``
    and ones, from ``vmap``: :class:`~headwater.gradients.layers.DiagonalPart`).

    Args:
        model: the model (left unchanged; evaluated in eval mode).
        task: loss, measurement and analysed parameters.
        blocks: from :func:`~headwater.gradients.layers.find_blocks` or a fitted
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
    diagonal = DiagonalPart(model, task, blocks, params)
    total, done = num_examples(data, name), 0
    with evaluation_mode(model), torch.enable_grad():
        for batch in iter_batches(data, chunk_size, name):
            x, y = prepare_batch(batch, ref)
            if done == 0:
                check_batch(model, task, (x, y), name, objective)
            live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
            with capture(model, blocks) as cap:
                values = value_fn(bind(model, live), (x, y))
            check_values(values, y.shape[0], name, done)
            signals = {**cap.signals(values.sum()), **diagonal.gradients((x, y), value_fn)}
            acts = {**cap.activations(), **diagonal.activations(y.shape[0], values)}
            check_finite_rows(
                [*signals.values(), *acts.values()], what="layer gradient", name=name, offset=done
            )  # the per-example gradients are Σ_t s_t ã_tᵀ
            done += y.shape[0]
            report(progress, f"module gradients ({name})", done, total)
            yield {b.module: (signals[b.module], acts[b.module]) for b in blocks}


def check_block_curvature(model: nn.Module, task: Task, curvature: KroneckerCurvature) -> None:
    if not isinstance(curvature, KroneckerCurvature):
        raise TypeError(
            f"curvature: expected a fitted KFAC or EKFAC, got {type(curvature).__name__}"
        )
    curvature._check_fitted()
    if ParamLayout.of(task.parameters(model)) != curvature.layout:
        raise ValueError(
            "curvature: it was fitted on other analysed parameters than task selects "
            "in model; refit it or pass the matching task"
        )


@dataclass(frozen=True)
class BlockFeatures(Features):
    """Per-module features ``{module: [N, out·width]}``; their dot product is the sum over
    modules (``stacked=True``: one ``[M, N_self, N_other]`` slice per module instead)."""

    parts: dict[str, Tensor]
    stacked: bool = False

    @classmethod
    def of(cls, grads: dict[str, Tensor], *, stacked: bool = False) -> BlockFeatures:
        """From block gradients or preconditioned blocks ``{module: [N, out, width]}``."""
        return cls({m: g.reshape(g.shape[0], -1) for m, g in grads.items()}, stacked)

    def __len__(self) -> int:
        return next(iter(self.parts.values())).shape[0]

    def __getitem__(self, rows: slice) -> BlockFeatures:
        return BlockFeatures({m: p[rows] for m, p in self.parts.items()}, self.stacked)

    def dot(self, other: BlockFeatures) -> Tensor:
        tiles = [mine @ other.parts[m].to(mine.dtype).T for m, mine in self.parts.items()]
        return torch.stack(tiles) if self.stacked else sum(tiles[1:], tiles[0])


def preconditioned_blocks(
    model: nn.Module,
    task: Task,
    curvature: KroneckerCurvature,
    query: DataLike,
    *,
    chunk_size: int,
    progress: ProgressFn | None,
    stacked: bool = False,
) -> BlockFeatures:
    """``(M_m + (wd + λ_m) I)⁻¹ G_m(z_q)`` per block, ``{module: [n_query, out·width]}``,
    written into preallocated rows (no concatenated copy)."""
    blocks, n_query = curvature.blocks, num_examples(query, "query")
    left: dict[str, Tensor] = {}
    row = 0
    for grads in module_gradients(
        model,
        task,
        blocks,
        query,
        objective=Objective.MEASUREMENT,
        chunk_size=chunk_size,
        name="query",
        progress=progress,
    ):
        for module, pre in curvature.solve_blocks(grads).items():
            if module not in left:
                left[module] = pre.new_empty(n_query, pre[0].numel())
            left[module][row : row + pre.shape[0]] = pre.reshape(pre.shape[0], -1)
        row += pre.shape[0]
    return BlockFeatures(left, stacked)


def train_blocks(
    model: nn.Module,
    task: Task,
    curvature: KroneckerCurvature,
    train: DataLike,
    *,
    chunk_size: int,
    progress: ProgressFn | None,
    stacked: bool = False,
    self_sink: list[Tensor] | None = None,
) -> Iterator[BlockFeatures]:
    """This rank's shard of the training block gradients, chunk by chunk; with ``self_sink``
    each chunk's self-influence ``Σ_m ⟨(M_m + …)⁻¹ G_m, G_m⟩ [chunk]`` is appended to it."""
    if _shard_size(train) == 0:
        return
    for grads in module_gradients(
        model,
        task,
        curvature.blocks,
        shard(train, "train"),
        objective=Objective.TRAIN,
        chunk_size=chunk_size,
        name="train",
        progress=progress,
    ):
        if self_sink is not None:
            solved = curvature.solve_blocks(grads)
            self_sink.append(sum((solved[m] * g).sum(dim=(1, 2)) for m, g in grads.items()))
        yield BlockFeatures.of(grads, stacked=stacked)


def _shard_size(train: DataLike) -> int:
    start, stop = shard_range(num_examples(train, "train"))
    return stop - start


def module_scores(
    model: nn.Module,
    task: Task,
    curvature: KroneckerCurvature,
    query: DataLike,
    train: DataLike,
    *,
    chunk_size: int = 64,
    progress: ProgressFn | None = None,
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
    check_block_curvature(model, task, curvature)
    left = preconditioned_blocks(
        model, task, curvature, query, chunk_size=chunk_size, progress=progress, stacked=True
    )
    chunks = train_blocks(
        model, task, curvature, train, chunk_size=chunk_size, progress=progress, stacked=True
    )
    stacked = pairwise(
        left, chunks, _shard_size(train), query_chunk=max(len(left), 1)
    )  # [M, n_query, n_local]
    return {
        module: gather_columns(block) for module, block in zip(left.parts, stacked, strict=True)
    }


def factored_scores(
    model: nn.Module,
    task: Task,
    curvature: KroneckerCurvature,
    query: DataLike,
    train: DataLike,
    *,
    chunk_size: int = 64,
    query_chunk: int = 256,
    progress: ProgressFn | None = None,
    self_sink: list[Tensor] | None = None,
) -> Tensor:
    """Total influence ``[n_query, n_train]``: the sum over modules of :func:`module_scores`
    (same arguments; same convention as ``InfluenceFunction.scores``), through the one tiled
    loop (:func:`~headwater.methods.scoring.pairwise`) without keeping the per-module
    matrices. With ``self_sink`` (a list), the self-influence of this rank's training
    examples is appended to it chunk by chunk, from the same pass over the training gradients."""
    check_block_curvature(model, task, curvature)
    left = preconditioned_blocks(
        model, task, curvature, query, chunk_size=chunk_size, progress=progress
    )
    chunks = train_blocks(
        model, task, curvature, train, chunk_size=chunk_size, progress=progress, self_sink=self_sink
    )
    return gather_columns(pairwise(left, chunks, _shard_size(train), query_chunk=query_chunk))
