"""The one tiled scoring loop: ``scores = ⟨L, G⟩`` by (query tile × train chunk).

``L`` holds the query features after preconditioning (for influence,
``(H + λI)⁻¹ ∇m(q)``), ``G`` the training features, arriving chunk by chunk, so
memory is ``O(n_query·P + chunk·P)`` plus the output, never ``n_train × P``. A
feature is a flat ``[N, P]`` tensor (per-example gradients, projected gradients)
or :class:`Features` with its own dot product: per-module blocks for K-FAC/EK-FAC
(:class:`~headwater.methods.factored.BlockFeatures`), layer factors for TracIn
(:class:`~headwater.methods.layer_products.LayerGradients`). ``pairwise`` (all
scores) and ``pairwise_top_k`` (streamed) share the tiles; a fused self-influence
taps the training chunks on their way in.

Under ``torch.distributed`` each rank scores its shard of the training data; the
columns are gathered (:func:`~headwater.distributed.gather_columns`) and top-k
candidates merged (:func:`gather_top_k`) so every rank returns the global result.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import Tensor

from headwater.distributed import gather_columns, world
from headwater.errors import check_finite_rows

__all__ = [
    "FeatureLike",
    "Features",
    "Scores",
    "check_scores",
    "check_top_k",
    "gather_top_k",
    "pairwise",
    "pairwise_top_k",
    "sharded_extremes",
    "sharded_top_k",
    "teed",
    "top_k_of",
]


T = TypeVar("T")


@dataclass(frozen=True)
class Scores:
    """Attribution scores.

    Attributes:
        values: ``[n_query, n_train]``, or with ``top_k`` the ``k`` largest scores per query
            ``[n_query, k]`` (proponents, most helpful first).
        indices: training indices ``[n_query, k]`` of a top-k result, else ``None``.
        self_influence: ``[n_train]`` where computed, else ``None``.
        settings: everything needed to reproduce the result.
        opponent_values: with ``top_k``, the ``k`` smallest scores per query ``[n_query, k]``
            (opponents, most harmful first), else ``None``.
        opponent_indices: their training indices ``[n_query, k]``, else ``None``.
    """

    values: Tensor
    indices: Tensor | None = None
    self_influence: Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    opponent_values: Tensor | None = None
    opponent_indices: Tensor | None = None


def check_scores(scores: Scores) -> Scores:
    """``scores``, after checking that no value is NaN/inf (naming the training examples, or
    the queries of a top-k result, where one is)."""
    damping = scores.settings.get("damping")
    if isinstance(damping, int | float) and not isinstance(damping, bool) and damping == 0:
        cause = "damping=0 with a singular curvature (a zero eigenvalue is divided by); pass damping > 0"
    else:
        cause = "an overflow in the scores; try float64 or a larger damping"
    if scores.indices is None:
        check_finite_rows(scores.values.T, what="score", name="train", cause=cause)
    else:
        check_finite_rows(scores.values, what="top-k score", name="query", cause=cause)
    if scores.opponent_values is not None:
        check_finite_rows(scores.opponent_values, what="top-k score", name="query", cause=cause)
    if scores.self_influence is not None:
        check_finite_rows(
            scores.self_influence.unsqueeze(1), what="self-influence", name="train", cause=cause
        )
    return scores


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


class Features(ABC):
    """Per-example features of ``N`` examples that are not one flat ``[N, P]`` tensor
    (per-module blocks, layer factors); a flat tensor is used as it is."""

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def __getitem__(self, rows: slice) -> Features:
        """The features of examples ``rows``."""

    @abstractmethod
    def dot(self, other: Features) -> Tensor:
        """``⟨f_q, f_i⟩`` for every pair, ``[N_self, N_other]`` (or ``[..., N_self, N_other]``)."""


FeatureLike = Tensor | Features
"""What the loop consumes: a flat ``[N, P]`` tensor or :class:`Features`."""


def _dot(left: FeatureLike, right: FeatureLike) -> Tensor:
    if isinstance(left, Tensor):
        return left @ right.to(left.dtype).T
    return left.dot(right)


def _tiles(
    left: FeatureLike, chunk: FeatureLike, query_chunk: int
) -> Iterable[tuple[slice, Tensor]]:
    for start in range(0, len(left), query_chunk):
        rows = slice(start, start + query_chunk)
        yield rows, _dot(left[rows], chunk)


def pairwise(
    left: FeatureLike, train_grads: Iterable[FeatureLike], n_train: int, *, query_chunk: int = 256
) -> Tensor:
    """All scores ``[n_query, n_train]`` (``[..., n_query, n_train]`` when the features'
    dot product has leading dimensions, e.g. one score matrix per module)."""
    out: Tensor | None = None
    col = 0
    for chunk in train_grads:  # [B, P] or Features of B examples
        cols = slice(col, col + len(chunk))
        for rows, tile in _tiles(left, chunk, query_chunk):
            if out is None:
                out = tile.new_empty(*tile.shape[:-2], len(left), n_train)
            out[..., rows, cols] = tile
        col += len(chunk)
    if col != n_train:
        raise RuntimeError(f"expected {n_train} training gradients, got {col}")
    return _empty_scores(left, n_train) if out is None else out  # None: an empty shard


def _empty_scores(left: FeatureLike, n_train: int) -> Tensor:
    """An uninitialised score matrix for ``left`` (dtype, device, leading dimensions of its dot)."""
    probe = _dot(left[0:0], left[0:0])  # [..., 0, 0]
    return probe.new_empty(*probe.shape[:-2], len(left), n_train)


def pairwise_top_k(
    left: FeatureLike,
    train_grads: Iterable[FeatureLike],
    k: int,
    *,
    largest: bool = True,
    query_chunk: int = 256,
) -> tuple[Tensor, Tensor]:
    """The ``k`` largest (or smallest) scores per query, streamed: ``(values, indices)``, ``[n_query, k]``."""
    return _streamed_best(left, train_grads, k, (largest,), query_chunk)[0]


def _streamed_best(
    left: FeatureLike,
    train_grads: Iterable[FeatureLike],
    k: int,
    sides: tuple[bool, ...],
    query_chunk: int,
) -> list[tuple[Tensor, Tensor]]:
    """For each side (``True``: largest, ``False``: smallest), the best ``k`` scores per query
    and their training indices, from one pass over ``train_grads``."""
    check_top_k(k)
    best: list[tuple[Tensor, Tensor]] | None = None
    col = 0
    for chunk in train_grads:
        tile = torch.cat([t for _, t in _tiles(left, chunk, query_chunk)])
        if best is None:
            best = [
                (
                    tile.new_empty(len(left), 0),
                    torch.empty(len(left), 0, dtype=torch.long, device=tile.device),
                )
                for _ in sides
            ]
        idx = torch.arange(col, col + len(chunk), device=tile.device).expand(len(left), -1)
        for s, largest in enumerate(sides):
            cand_v, cand_i = (
                torch.cat([best[s][0], tile], dim=1),
                torch.cat([best[s][1], idx], dim=1),
            )
            values, pos = cand_v.topk(min(k, cand_v.shape[1]), dim=1, largest=largest, sorted=True)
            best[s] = (values, cand_i.gather(1, pos))
        col += len(chunk)
    if col < k:
        raise ValueError(f"top_k: asked for {k} but there are only {col} training examples")
    return best


def sharded_top_k(
    left: FeatureLike,
    train_grads: Iterable[FeatureLike],
    k: int,
    *,
    n_train: int,
    start: int,
    n_local: int,
    largest: bool = True,
    query_chunk: int = 256,
) -> tuple[Tensor, Tensor]:
    """:func:`pairwise_top_k` over this rank's ``n_local`` training rows (global indices from
    ``start``), merged across ranks by :func:`gather_top_k` (collective; an empty shard
    takes part with no candidates). ``n_train`` is the global count, checked against ``k``."""
    return sharded_extremes(
        left,
        train_grads,
        k,
        n_train=n_train,
        start=start,
        n_local=n_local,
        sides=(largest,),
        query_chunk=query_chunk,
    )[0]


def sharded_extremes(
    left: FeatureLike,
    train_grads: Iterable[FeatureLike],
    k: int,
    *,
    n_train: int,
    start: int,
    n_local: int,
    sides: tuple[bool, ...] = (True, False),
    query_chunk: int = 256,
) -> list[tuple[Tensor, Tensor]]:
    """:func:`sharded_top_k` for several sides at once (default: the ``k`` largest scores,
    proponents, and the ``k`` smallest, opponents) from one pass over the training features."""
    check_top_k(k, n_train)
    if n_local == 0:
        values = _empty_scores(left, 0)
        found = [
            (values, torch.empty(len(left), 0, dtype=torch.long, device=values.device))
            for _ in sides
        ]
    else:
        found = [
            (v, i + start)
            for v, i in _streamed_best(  # global training indices
                left, train_grads, min(k, n_local), sides, query_chunk
            )
        ]
    return [
        gather_top_k(v, i, k, largest=largest) for (v, i), largest in zip(found, sides, strict=True)
    ]


def teed(chunks: Iterable[T], sink: list[Tensor], self_dots: Callable[[T], Tensor]) -> Iterator[T]:
    """``chunks`` unchanged, appending each chunk's self-influence ``self_dots(chunk) [B]`` to
    ``sink`` on the way (the fused self-influence of one pass over the training data)."""
    for chunk in chunks:
        sink.append(self_dots(chunk))
        yield chunk


def gather_top_k(
    values: Tensor, indices: Tensor, k: int, *, largest: bool = True
) -> tuple[Tensor, Tensor]:
    """The best ``k`` per query among every rank's candidates: ``(values, indices)``,
    each ``[n_query, k]``, sorted, on every rank.

    Each rank passes its own top candidates ``[n_query, k_r]`` (``k_r`` may differ
    and be 0) with *global* training indices; with one process they are returned
    unchanged. Collective under ``torch.distributed``.

    Raises:
        ValueError: naming ``values``/``indices`` if their shapes differ, or ``top_k``
            if the ranks hold fewer than ``k`` candidates together.
    """
    if values.shape != indices.shape or values.dim() != 2:
        raise ValueError(
            f"values/indices: expected two [n_query, k] tensors of one shape, got "
            f"{tuple(values.shape)} and {tuple(indices.shape)}"
        )
    if world()[1] == 1:
        return values, indices
    all_v, all_i = gather_columns(values), gather_columns(indices)  # [n_query, Σ_r k_r]
    if all_v.shape[1] < k:
        raise ValueError(
            f"top_k: asked for {k} but there are only {all_v.shape[1]} training examples"
        )
    best_v, pos = all_v.topk(k, dim=1, largest=largest, sorted=True)
    return best_v, all_i.gather(1, pos)
