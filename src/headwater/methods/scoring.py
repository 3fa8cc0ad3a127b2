"""The shared tiled scoring loop: ``scores = L @ Gᵀ`` by (query tile × train chunk).

``L [n_query, P]`` holds the query vectors after preconditioning (for influence,
``(H + λI)⁻¹ ∇m(q)``); training gradients arrive chunk by chunk, so memory is
``O(n_query·P + chunk·P)`` plus the output, never ``n_train × P``.

Under ``torch.distributed`` each rank scores its shard of the training data; the
columns are gathered (:func:`~headwater.distributed.gather_columns`) and top-k
candidates merged (:func:`gather_top_k`) so every rank returns the global result.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from headwater.distributed import gather_columns, world
from headwater.errors import check_finite_rows

__all__ = ["Scores", "check_scores", "gather_top_k", "pairwise", "pairwise_top_k", "sharded_top_k"]


@dataclass(frozen=True)
class Scores:
    """Attribution scores.

    Attributes:
        values: ``[n_query, n_train]``, or ``[n_query, k]`` with ``indices`` when top-k.
        indices: training indices ``[n_query, k]`` of a top-k result, else ``None``.
        self_influence: ``[n_train]`` where computed, else ``None``.
        settings: everything needed to reproduce the result.
    """

    values: Tensor
    indices: Tensor | None = None
    self_influence: Tensor | None = None
    settings: dict[str, Any] = field(default_factory=dict)


def check_scores(scores: Scores) -> Scores:
    """``scores``, after checking that no value is NaN/inf (naming the training examples, or
    the queries of a top-k result, where one is)."""
    cause = "an overflow in the scores; try float64 or a larger damping"
    if scores.indices is None:
        check_finite_rows(scores.values.T, what="score", name="train", cause=cause)
    else:
        check_finite_rows(scores.values, what="top-k score", name="query", cause=cause)
    if scores.self_influence is not None:
        check_finite_rows(scores.self_influence.unsqueeze(1), what="self-influence", name="train", cause=cause)
    return scores


def _tiles(left: Tensor, chunk: Tensor, query_chunk: int) -> Iterable[tuple[slice, Tensor]]:
    for start in range(0, left.shape[0], query_chunk):
        rows = slice(start, start + query_chunk)
        yield rows, left[rows] @ chunk.to(left.dtype).T


def pairwise(left: Tensor, train_grads: Iterable[Tensor], n_train: int, *, query_chunk: int = 256) -> Tensor:
    """All scores ``[n_query, n_train]``."""
    out = torch.empty(left.shape[0], n_train, dtype=left.dtype, device=left.device)
    col = 0
    for chunk in train_grads:  # [B, P]
        cols = slice(col, col + chunk.shape[0])
        for rows, tile in _tiles(left, chunk, query_chunk):
            out[rows, cols] = tile
        col += chunk.shape[0]
    if col != n_train:
        raise RuntimeError(f"expected {n_train} training gradients, got {col}")
    return out


def pairwise_top_k(left: Tensor, train_grads: Iterable[Tensor], k: int, *, largest: bool = True,
                   query_chunk: int = 256) -> tuple[Tensor, Tensor]:
    """The ``k`` largest (or smallest) scores per query, streamed: ``(values, indices)``, ``[n_query, k]``."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"top_k: must be a positive integer, got {k!r}")
    best_v = torch.empty(left.shape[0], 0, dtype=left.dtype, device=left.device)
    best_i = torch.empty(left.shape[0], 0, dtype=torch.long, device=left.device)
    col = 0
    for chunk in train_grads:
        tile = torch.cat([t for _, t in _tiles(left, chunk, query_chunk)])
        idx = torch.arange(col, col + chunk.shape[0], device=left.device).expand(left.shape[0], -1)
        cand_v = torch.cat([best_v, tile], dim=1)
        cand_i = torch.cat([best_i, idx], dim=1)
        keep = min(k, cand_v.shape[1])
        best_v, pos = cand_v.topk(keep, dim=1, largest=largest, sorted=True)
        best_i = cand_i.gather(1, pos)
        col += chunk.shape[0]
    if best_v.shape[1] < k:
        raise ValueError(f"top_k: asked for {k} but there are only {best_v.shape[1]} training examples")
    return best_v, best_i


def sharded_top_k(left: Tensor, train_grads: Iterable[Tensor], k: int, *, n_train: int, start: int,
                  n_local: int, largest: bool = True, query_chunk: int = 256) -> tuple[Tensor, Tensor]:
    """:func:`pairwise_top_k` over this rank's ``n_local`` training rows (global indices from
    ``start``), merged across ranks by :func:`gather_top_k` (collective; an empty shard
    takes part with no candidates). ``n_train`` is the global count, checked against ``k``."""
    if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
        raise ValueError(f"top_k: must be a positive integer, got {k!r}")
    if k > n_train:
        raise ValueError(f"top_k: asked for {k} but there are only {n_train} training examples")
    if n_local == 0:
        values = left.new_empty(left.shape[0], 0)
        indices = torch.empty(left.shape[0], 0, dtype=torch.long, device=left.device)
    else:
        values, indices = pairwise_top_k(left, train_grads, min(k, n_local), largest=largest,
                                         query_chunk=query_chunk)
        indices = indices + start  # global training indices
    return gather_top_k(values, indices, k, largest=largest)


def gather_top_k(values: Tensor, indices: Tensor, k: int, *, largest: bool = True
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
        raise ValueError(f"values/indices: expected two [n_query, k] tensors of one shape, got "
                         f"{tuple(values.shape)} and {tuple(indices.shape)}")
    if world()[1] == 1:
        return values, indices
    all_v, all_i = gather_columns(values), gather_columns(indices)  # [n_query, Σ_r k_r]
    if all_v.shape[1] < k:
        raise ValueError(f"top_k: asked for {k} but there are only {all_v.shape[1]} training examples")
    best_v, pos = all_v.topk(k, dim=1, largest=largest, sorted=True)
    return best_v, all_i.gather(1, pos)
