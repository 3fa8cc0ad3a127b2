"""Influence functions (Koh & Liang 2017) on any curvature approximation."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn

from headwater import store as store_mod
from headwater.curvature.base import Curvature
from headwater.curvature.kfac import KroneckerCurvature
from headwater.data import DataLike, iter_batches, num_examples
from headwater.distributed import all_ranks, barrier, gather_columns, shard, shard_range, world
from headwater.errors import StoreError
from headwater.gradients.flat import ParamLayout
from headwater.gradients.per_example import Objective, per_example_gradients
from headwater.methods.factored import factored_scores
from headwater.methods.layer_products import layer_blocks
from headwater.methods.scoring import pairwise, sharded_top_k
from headwater.progress import ProgressFn, report
from headwater.task import Task
from headwater.train.ensemble import fingerprint

__all__ = ["CONTEXT_EXAMPLES", "InfluenceFunction", "fit_context"]

log = logging.getLogger("headwater.store")


CONTEXT_EXAMPLES = 256
"""Examples of a Dataset/DataLoader fingerprinted by :func:`fit_context` (pairs of tensors: all)."""


def fit_context(model: nn.Module, task: Task, train: DataLike) -> dict[str, Any]:
    """What a stored fit depends on besides its own settings (fingerprints): the task (its
    loss, weight decay and analysed modules; not the query measurement),
    every parameter and buffer of the model (a frozen layer changes the curvature
    too), the number of training examples and their contents: all of them for an
    ``(inputs, targets)`` pair of tensors, the first :data:`CONTEXT_EXAMPLES` of a
    Dataset or DataLoader (so a change past those is not noticed)."""
    if isinstance(train, tuple | list):
        data = fingerprint(*map(torch.as_tensor, train))
    else:
        data = fingerprint(*map(torch.as_tensor, next(iter_batches(train, CONTEXT_EXAMPLES, "train"))))
    task_key = {k: v for k, v in task.to_dict().items() if k != "measurement"}  # fits never use it
    return {"task": task_key, "model": fingerprint(*model.state_dict().values()),
            "n_train": num_examples(train, "train"), "train": data}


class InfluenceFunction:
    """``score[q, i] = ∇m(z_q)ᵀ (M + λI)⁻¹ ∇ℓ(z_i)``.

    ``M`` is the curvature of the *mean* training objective. Removing training
    example ``i`` changes query ``q``'s measurement by about ``+score[q, i] / n``:
    with the loss as measurement, a positive score marks a proponent (removing it
    raises the query's loss), a negative one an opponent.
    (Koh & Liang 2017, "Understanding Black-box Predictions via Influence Functions".)

    Under ``torch.distributed`` (every rank passing the same data) the curvature is
    fitted on every rank's shard and summed across ranks, each rank computes the
    training gradients of its shard only, and ``scores``, ``top_k`` and
    ``self_influence`` return the whole result in global order on every rank; every
    method is then collective.

    Args:
        model: the trained model (never modified).
        task: loss, measurement and analysed parameters.
        curvature: an unfitted or fitted :class:`~headwater.curvature.base.Curvature`.
        chunk_size: examples per per-example-gradient step.
        query_chunk: query rows per scoring tile.
        query_batch: queries whose preconditioned gradients are held at once (``None``:
            all of them, ``[n_query, P]``). Scores are computed batch by batch, each
            batch streaming the training gradients once more: memory
            ``query_batch × P`` instead of ``n_query × P``, same numbers.
        progress: optional ``progress(stage, done, total)`` callback.
    """

    def __init__(self, model: nn.Module, task: Task, curvature: Curvature, *, chunk_size: int = 64,
                 query_chunk: int = 256, query_batch: int | None = None, progress: ProgressFn | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(task, Task):
            raise TypeError(f"task: expected a headwater Task, got {type(task).__name__}")
        if not isinstance(curvature, Curvature):
            raise TypeError(f"curvature: expected a headwater Curvature, got {type(curvature).__name__}")
        for arg, value in (("chunk_size", chunk_size), ("query_chunk", query_chunk)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{arg}: must be a positive integer, got {value!r}")
        if query_batch is not None and (isinstance(query_batch, bool) or not isinstance(query_batch, int)
                                        or query_batch <= 0):
            raise ValueError(f"query_batch: must be a positive integer or None, got {query_batch!r}")
        self.model, self.task, self.curvature = model, task, curvature
        self.chunk_size, self.query_chunk, self.progress = chunk_size, query_chunk, progress
        self.query_batch = query_batch
        self.store_status: str | None = None  # what fit() did with its store, in one line

    def _by_query_batch(self, query: DataLike, compute) -> tuple[Tensor, ...] | None:
        """``compute(batch)`` (a tuple of ``[rows, ...]`` tensors) for each batch of
        ``query_batch`` queries, written into preallocated ``[n_query, ...]`` outputs; ``None``
        when one batch holds every query (the caller then works on ``query`` whole)."""
        n_query = num_examples(query, "query")
        if self.query_batch is None or n_query <= self.query_batch:
            return None
        out: list[Tensor] = []
        row = 0
        for batch in iter_batches(query, self.query_batch, "query"):
            parts = compute(batch)
            if not out:
                out = [p.new_empty(n_query, *p.shape[1:]) for p in parts]
            for target, part in zip(out, parts, strict=True):
                target[row : row + part.shape[0]] = part
            row += parts[0].shape[0]
        return tuple(out)

    def fit(self, train: DataLike, *, store: str | os.PathLike | None = None,
            read_only: bool = False) -> InfluenceFunction:
        """Fit the curvature on the training data.

        With ``store`` (a base path), a curvature fitted earlier with the same settings,
        model and training data (:func:`fit_context`) is loaded from there instead of
        refitted (matrix-free ones are re-attached to the data with ``bind``); otherwise
        it is fitted and saved there
        (by rank 0 under ``torch.distributed``; the ranks load only when every rank sees
        the store). A store fitted on anything else raises ``StoreMismatchError`` naming
        what differs (see :func:`fit_context`); a damaged one (size or checksum) is
        refitted after one warning line, or with ``read_only`` raises ``StoreError``
        (as does a missing one). :attr:`store_status` and :meth:`settings` say which."""
        if store is None:
            self.curvature.fit(self.model, self.task, train, progress=self.progress)
            return self
        context = fit_context(self.model, self.task, train)
        self.store_status = f"curvature fitted and saved to {store}"
        if all_ranks(store_mod.exists(store)):  # ranks decide together: a fit is collective
            layout = ParamLayout.of(self.task.parameters(self.model))
            try:
                store_mod.on_every_rank(lambda: self.curvature.load(store, layout=layout, context=context), store)
            except store_mod.StoreDamagedError as err:
                if read_only:
                    raise
                log.warning("%s; refitting it", err)
                self.store_status = f"curvature refitted: {err}"
            else:
                if self.curvature.solve_streams_data:  # CG, LiSSA: re-attach the data's operator
                    self.curvature.bind(self.model, self.task, train)
                report(self.progress, "curvature (loaded)", 1, 1)
                self.store_status = f"curvature loaded from {store} (checksum verified)"
                log.info("reusing the stored curvature: %s", store)
                return self
        elif read_only:
            raise StoreError(f"store: no complete store at {store} to read (read_only=True)")
        self.curvature.fit(self.model, self.task, train, progress=self.progress)
        if world()[0] == 0:
            self.curvature.save(store, context=context)
        barrier()  # the store is complete before any rank goes on (and may look for it)
        return self

    def _grads(self, data: DataLike, objective: Objective, name: str):
        return per_example_gradients(self.model, self.task, data, objective=objective,
                                     chunk_size=self.chunk_size, name=name, progress=self.progress)

    def _shard_grads(self, train: DataLike) -> tuple[Iterable[Tensor], int, int]:
        """Training gradients ``[chunk, P]`` of this rank's shard, its first global index
        and its size (all of ``train`` with one process; none for an empty shard)."""
        start, stop = shard_range(num_examples(train, "train"))
        if stop == start:
            return iter(()), start, 0
        return self._grads(shard(train, "train"), Objective.TRAIN, "train"), start, stop - start

    def preconditioned_queries(self, query: DataLike) -> Tensor:
        """``(M + λI)⁻¹ ∇m(z_q)`` for every query, ``[n_query, P]``, solved ``query_chunk``
        rows at a time (an iterative solver's passes over the data serve the whole block)."""
        n_query, left, row = num_examples(query, "query"), None, 0
        for batch in iter_batches(query, self.query_chunk, "query"):  # raw gradients: one tile at a time
            grads = torch.cat(list(per_example_gradients(self.model, self.task, batch, objective=Objective.MEASUREMENT,
                                                         chunk_size=self.chunk_size, name="query")))
            solved = self.curvature.solve(grads)
            if left is None:
                left = solved.new_empty(n_query, solved.shape[1])
            left[row : row + solved.shape[0]] = solved
            row += solved.shape[0]
            report(self.progress, "gradients (query)", row, n_query)
        return left

    def scores(self, query: DataLike, train: DataLike) -> Tensor:
        """All scores ``[n_query, n_train]``. With K-FAC/EK-FAC they are computed module by
        module (:func:`~headwater.methods.factored.factored_scores`), never flattening the
        model; the numbers are the same."""
        batched = self._by_query_batch(query, lambda batch: (self.scores(batch, train),))
        if batched is not None:
            return batched[0]
        if self._factored(train):
            return factored_scores(self.model, self.task, self.curvature, query, train,
                                   chunk_size=self.chunk_size, progress=self.progress)
        left = self.preconditioned_queries(query)
        grads, _, n_local = self._shard_grads(train)
        return gather_columns(pairwise(left, grads, n_local, query_chunk=self.query_chunk))

    def top_k(self, query: DataLike, train: DataLike, k: int, *, largest: bool = True) -> tuple[Tensor, Tensor]:
        """The ``k`` largest (proponents) or smallest (opponents) scores per query:
        ``(values, indices)``, each ``[n_query, k]``, streamed over the training data
        (under ``torch.distributed``: each rank's best of its shard, then merged)."""
        batched = self._by_query_batch(query, lambda batch: self.top_k(batch, train, k, largest=largest))
        if batched is not None:
            return batched
        left = self.preconditioned_queries(query)
        grads, start, n_local = self._shard_grads(train)
        return sharded_top_k(left, grads, k, n_train=num_examples(train, "train"), start=start, n_local=n_local,
                             largest=largest, query_chunk=self.query_chunk)

    def attribute(self, query: DataLike, train: DataLike, *, top_k: int | None = None,
                  self_influence: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """``(values, indices, self_influence)``: :meth:`scores` (``indices`` ``None``) or,
        with ``top_k``, :meth:`top_k`; with ``self_influence``, also :meth:`self_influence`.

        Both come from one pass over the training gradients: each chunk is scored against
        the queries and dotted with its own preconditioned gradient. The numbers are those
        of the separate methods. Curvatures whose solve streams over the data (CG, LiSSA)
        and several query batches (``query_batch``) make the passes separately."""
        fused = (self_influence and not self.curvature.solve_streams_data
                 and (self.query_batch is None or num_examples(query, "query") <= self.query_batch))
        if not fused:
            si = self.self_influence(train) if self_influence else None
            if top_k is None:
                return self.scores(query, train), None, si
            return (*self.top_k(query, train, top_k), si)
        ref = next(iter(self.task.parameters(self.model).values()))
        sink = [torch.empty(0, dtype=ref.dtype, device=ref.device)]  # this rank's self-influence
        indices = None
        if top_k is None and self._factored(train):
            values = factored_scores(self.model, self.task, self.curvature, query, train,
                                     chunk_size=self.chunk_size, progress=self.progress, self_sink=sink)
        else:
            left = self.preconditioned_queries(query)
            grads, start, n_local = self._shard_grads(train)
            grads = self._teed(grads, sink)
            if top_k is None:
                values = gather_columns(pairwise(left, grads, n_local, query_chunk=self.query_chunk))
            else:
                values, indices = sharded_top_k(left, grads, top_k, n_train=num_examples(train, "train"),
                                                start=start, n_local=n_local, query_chunk=self.query_chunk)
        return values, indices, gather_columns(torch.cat(sink).unsqueeze(0))[0]

    def _factored(self, train: DataLike) -> bool:
        """Score K-FAC/EK-FAC block by block from hooked layer gradients, unless those would
        miss a use of a parameter (:func:`~headwater.methods.layer_products.layer_blocks`):
        then the flat path with ``vmap`` gradients."""
        if not isinstance(self.curvature, KroneckerCurvature):
            return False
        try:
            layer_blocks(self.model, self.task, train)
        except ValueError:
            return False
        return True

    def _teed(self, grads: Iterable[Tensor], sink: list[Tensor]) -> Iterator[Tensor]:
        """``grads`` unchanged, appending each chunk's self-influence to ``sink`` on the way."""
        for g in grads:
            sink.append(self._self_dots(g))
            yield g

    def _self_dots(self, g: Tensor) -> Tensor:
        """``gᵢᵀ (M + λI)⁻¹ gᵢ`` for each row of a chunk ``[B, P]``."""
        return (self.curvature.solve(g) * g).sum(dim=1)

    def self_influence(self, train: DataLike) -> Tensor:
        """``∇ℓ(z_i)ᵀ (M + λI)⁻¹ ∇ℓ(z_i)`` for every training example, ``[n_train]``
        (large values flag unusual or mislabeled examples).

        Under ``torch.distributed`` each rank takes its shard, unless the curvature's
        solve itself streams over the data (CG, LiSSA): then every rank solves every
        chunk together (each solve is collective and shared)."""
        sharded = not self.curvature.solve_streams_data
        if sharded:
            grads, _, n = self._shard_grads(train)
        else:
            grads, n = self._grads(train, Objective.TRAIN, "train"), num_examples(train, "train")
        ref = next(iter(self.task.parameters(self.model).values()))
        out, done = [torch.empty(0, dtype=ref.dtype, device=ref.device)], 0
        for g in grads:
            out.append(self._self_dots(g))
            done += g.shape[0]
            report(self.progress, "self-influence", done, n)
        local = torch.cat(out)  # [n]
        return gather_columns(local.unsqueeze(0))[0] if sharded else local

    def settings(self) -> dict[str, Any]:
        return {"method": "influence", **self.curvature.settings(), "fitted_damping": self.curvature.fitted_damping,
                "task": self.task.to_dict(), "chunk_size": self.chunk_size, "query_batch": self.query_batch,
                **({"store": self.store_status} if self.store_status else {})}
