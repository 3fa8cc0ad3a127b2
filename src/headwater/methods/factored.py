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

Low-rank queries (``query_rank=r`` of K-FAC/EK-FAC, as Kronfluence's query low-rank
option): each preconditioned query block ``G̃ = (M_m + …)⁻¹ G_m(z_q)`` is replaced by its
rank-``r`` truncated SVD ``G̃_r = U_r U_rᵀ G̃`` (``U_r`` its top ``r`` left singular vectors;
the right ones when ``out > width``), kept as factors ``L [r, out]``, ``R [r, width]``
with ``G̃_r = Lᵀ R``. A training example's contribution is then taken from its layer
factors without forming its ``[out, width]`` gradient,

    ⟨G̃_r, Σ_t s_t ã_tᵀ⟩ = Σ_t (L s_t) · (R ã_t),

``r·(out + width)`` products per position instead of ``out·width``. The error of a block is
``|⟨G̃ − G̃_r, G⟩| ≤ σ_{r+1}(G̃) ‖G‖_* ≤ σ_{r+1}(G̃) Σ_t ‖s_t‖ ‖ã_t‖`` (trace duality; the
nuclear norm of a sum of outer products), so it is exact when ``r >= min(out, width)``; a
block where ``r·(out + width) >= out·width`` is kept whole (then it is also exact). The
SVD is taken in the Kronecker eigenbasis (``G̃ = Q_S C Q_Aᵀ``, the same singular values),
from the eigenvectors (float64) of the smaller Gram matrix of ``C``; a query's ``C`` is
rotated from its layer factors, its gradient never formed. Self-influence is
computed from the full-rank blocks.

Under ``torch.distributed`` each rank computes the columns of its shard of the
training data (:func:`~headwater.distributed.shard`) and the columns are gathered in
global order, so every rank returns the whole ``[n_query, n_train]`` (collective).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import scipy.linalg
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
    "BlockFactors",
    "BlockFeatures",
    "LowRankBlocks",
    "check_block_curvature",
    "factored_scores",
    "module_factors",
    "module_gradients",
    "module_scores",
    "num_part_rows",
    "part_rows",
    "preconditioned_blocks",
    "train_blocks",
    "truncated_blocks",
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


LOW_RANK_QUERY_CHUNK = 16
"""Queries preconditioned and truncated at once with ``query_rank`` (their dense blocks are
the transient: ``16 × P`` numbers plus the largest block's intermediates)."""

Factored = tuple[Tensor, Tensor] | Tensor  # (L [N, r, out], R [N, r, width]) or [N, out·width]


def part_rows(parts: dict[str, Factored], rows: slice) -> dict[str, Factored]:
    """Examples ``rows`` of every part: a tensor, or a pair of tensors sliced alike."""
    return {
        m: (p[0][rows], p[1][rows]) if isinstance(p, tuple) else p[rows] for m, p in parts.items()
    }


def num_part_rows(parts: dict[str, Factored]) -> int:
    """Examples in ``parts`` (their first dimension)."""
    first = next(iter(parts.values()))
    return (first[0] if isinstance(first, tuple) else first).shape[0]


def _dense(s: Tensor, a: Tensor) -> Tensor:
    """``Σ_t s_t ã_tᵀ`` flattened, ``[N, out·width]``, from ``s [N, T, out]``, ``ã [N, T, width]``."""
    return torch.einsum("bto,bti->boi", s, a).flatten(1)


@dataclass(frozen=True)
class BlockFactors(Features):
    """Per-module layer factors of ``N`` training examples ``{module: (s [N, T, out],
    ã [N, T, width])}``: the gradient ``Σ_t s_t ã_tᵀ`` is formed only where a block's
    query side is dense."""

    parts: dict[str, tuple[Tensor, Tensor]]

    def __len__(self) -> int:
        return num_part_rows(self.parts)

    def __getitem__(self, rows: slice) -> BlockFactors:
        return BlockFactors(part_rows(self.parts, rows))

    def dot(self, other: BlockFactors) -> Tensor:
        tiles = [_dense(*mine) @ _dense(*other.parts[m]).T for m, mine in self.parts.items()]
        return sum(tiles[1:], tiles[0])


@dataclass(frozen=True)
class LowRankBlocks(Features):
    """Truncated preconditioned query blocks (module docs): ``{module: (L [N, r, out],
    R [N, r, width])}``, or ``[N, out·width]`` for a block kept whole; dotted with
    :class:`BlockFactors` (``stacked=True``: one ``[M, N_self, N_other]`` slice per module)."""

    parts: dict[str, Factored]
    stacked: bool = False

    def __len__(self) -> int:
        return num_part_rows(self.parts)

    def __getitem__(self, rows: slice) -> LowRankBlocks:
        return LowRankBlocks(part_rows(self.parts, rows), self.stacked)

    def dot(self, other: BlockFactors) -> Tensor:
        tiles = []
        for module, mine in self.parts.items():
            s, a = other.parts[module]  # [B, T, out], [B, T, width]
            if isinstance(mine, Tensor):
                tiles.append(mine @ _dense(s, a).to(mine.dtype).T)
                continue
            left, right = mine  # [Q, r, out], [Q, r, width]
            n_query, rank = left.shape[:2]
            ls = s.to(left.dtype) @ left.reshape(n_query * rank, -1).T  # [B, T, Q·r]
            ra = a.to(left.dtype) @ right.reshape(n_query * rank, -1).T  # [B, T, Q·r]
            tiles.append((ls * ra).sum(1).view(-1, n_query, rank).sum(2).T)  # [Q, B]
        return torch.stack(tiles) if self.stacked else sum(tiles[1:], tiles[0])


def _basis(q: Tensor, x: Tensor) -> Tensor:
    """``q @ x`` (``x [K, n, r]``); an empty ``q`` is the identity."""
    return q @ x if q.numel() else x


def _top_eigenvectors(c: Tensor, rank: int, rows: bool) -> Tensor:
    """Eigenvectors of the ``rank`` largest eigenvalues of the Gram matrix ``C Cᵀ`` (``rows``)
    or ``Cᵀ C`` of each ``C`` in ``c [K, out, width]`` (in ``C``'s dtype, one at a time),
    ``[K, out or width, rank]`` (on CPU through LAPACK's subset solver: only those are
    computed)."""
    found = []
    for ci in c:
        gram = (ci @ ci.mT if rows else ci.mT @ ci).double()
        n = gram.shape[0]
        if gram.device.type != "cpu":
            found.append(torch.linalg.eigh(gram)[1][:, n - rank :])
            continue
        top = scipy.linalg.eigh(gram.numpy(), subset_by_index=(n - rank, n - 1), driver="evr")
        found.append(torch.from_numpy(top[1]))
    return torch.stack(found).to(c.device, c.dtype)


def truncated_blocks(
    blocks: dict[str, tuple[Tensor, Tensor, Tensor]], rank: int, *, whole_if_cheaper: bool = True
) -> dict[str, Factored]:
    """Rank-``rank`` truncated SVDs of ``Q_S C Q_Aᵀ`` (``{module: (Q_S, C [K, out, width],
    Q_A)}``, from ``KroneckerCurvature.eigenbasis_blocks``) as :class:`LowRankBlocks` parts
    (module docs). ``whole_if_cheaper``: keep a block whole where the factors would not be
    smaller (``False``: always factor, ``rank <= min(out, width)``; for tests)."""
    out: dict[str, Factored] = {}
    for module, (qs, c, qa) in blocks.items():
        k, n_out, width = c.shape
        r = min(rank, n_out, width)
        if whole_if_cheaper and rank * (n_out + width) >= n_out * width:
            out[module] = _basis(qs, _basis(qa, c.mT).mT).reshape(k, -1)
            continue
        vectors = _top_eigenvectors(c, r, n_out <= width)  # [K, out or width, r]
        if n_out <= width:
            left, right = vectors, c.mT @ vectors  # [K, out, r], [K, width, r]
        else:
            left, right = c @ vectors, vectors
        out[module] = tuple(
            _basis(q, f).mT.contiguous()
            for q, f in ((qs.to(c.dtype), left), (qa.to(c.dtype), right))
        )
    return out


def preconditioned_blocks(
    model: nn.Module,
    task: Task,
    curvature: KroneckerCurvature,
    query: DataLike,
    *,
    chunk_size: int,
    progress: ProgressFn | None,
    stacked: bool = False,
) -> BlockFeatures | LowRankBlocks:
    """``(M_m + (wd + λ_m) I)⁻¹ G_m(z_q)`` per block, ``{module: [n_query, out·width]}``,
    written into preallocated rows (no concatenated copy); with the curvature's
    ``query_rank``, their truncations (:class:`LowRankBlocks`), chunk by chunk."""
    blocks, n_query = curvature.blocks, num_examples(query, "query")
    rank = curvature.query_rank
    if rank is not None:  # the chunk's [chunk, out, width] blocks are the largest transient
        chunk_size = min(chunk_size, LOW_RANK_QUERY_CHUNK)
    left: dict[str, Tensor | list[Tensor]] = {}
    row = 0
    for grads in (module_factors if rank is not None else module_gradients)(
        model,
        task,
        blocks,
        query,
        objective=Objective.MEASUREMENT,
        chunk_size=chunk_size,
        name="query",
        progress=progress,
    ):
        solved = (  # with a rank: from the layer factors, the gradients never formed
            truncated_blocks(curvature.eigenbasis_blocks(grads), rank)
            if rank is not None
            else curvature.solve_blocks(grads)
        )
        for module, pre in solved.items():
            parts = pre if isinstance(pre, tuple) else (pre.reshape(pre.shape[0], -1),)
            if module not in left:
                left[module] = [p.new_empty(n_query, *p.shape[1:]) for p in parts]
            for target, part in zip(left[module], parts, strict=True):
                target[row : row + part.shape[0]] = part
        row += parts[0].shape[0]
    if rank is None:
        return BlockFeatures({m: p[0] for m, p in left.items()}, stacked)
    return LowRankBlocks({m: p[0] if len(p) == 1 else tuple(p) for m, p in left.items()}, stacked)


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
) -> Iterator[BlockFeatures | BlockFactors]:
    """This rank's shard of the training block gradients, chunk by chunk (their layer
    factors, :class:`BlockFactors`, with the curvature's ``query_rank``); with ``self_sink``
    each chunk's self-influence ``Σ_m ⟨(M_m + …)⁻¹ G_m, G_m⟩ [chunk]`` is appended to it."""
    if _shard_size(train) == 0:
        return
    for factors in module_factors(
        model,
        task,
        curvature.blocks,
        shard(train, "train"),
        objective=Objective.TRAIN,
        chunk_size=chunk_size,
        name="train",
        progress=progress,
    ):
        low_rank = curvature.query_rank is not None
        grads = (
            {m: torch.einsum("bto,bti->boi", s, a) for m, (s, a) in factors.items()}
            if self_sink is not None or not low_rank
            else {}
        )
        if self_sink is not None:
            solved = curvature.solve_blocks(grads)
            self_sink.append(sum((solved[m] * g).sum(dim=(1, 2)) for m, g in grads.items()))
        yield BlockFactors(factors) if low_rank else BlockFeatures.of(grads, stacked=stacked)


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
