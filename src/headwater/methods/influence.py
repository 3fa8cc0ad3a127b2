"""Influence functions (Koh & Liang 2017) on any curvature approximation."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from headwater.curvature.base import Curvature
from headwater.data import DataLike, as_tensors, iter_batches, num_examples
from headwater.distributed import gather_columns, shard, shard_range
from headwater.gradients.flat import ParamLayout
from headwater.gradients.per_example import Objective, per_example_gradients
from headwater.methods.estimator import Estimator, check_top_k
from headwater.methods.factored import check_block_curvature, preconditioned_blocks, train_blocks
from headwater.methods.layer_products import layer_blocks
from headwater.methods.scoring import FeatureLike, Scores, pairwise, sharded_extremes, teed
from headwater.progress import ProgressFn, report
from headwater.store.cached import cached, fingerprint
from headwater.task import Task

__all__ = ["CONTEXT_EXAMPLES", "InfluenceFunction", "fit_context"]


CONTEXT_EXAMPLES = 256
"""Examples of a Dataset/DataLoader fingerprinted by :func:`fit_context` (pairs of tensors: all)."""


def fit_context(model: nn.Module, task: Task, train: DataLike) -> dict[str, Any]:
    """What a stored fit depends on besides its own settings (fingerprints): the task (its
    loss, weight decay and analysed modules; not the query measurement),
    every parameter and buffer of the model (a frozen layer changes the curvature
    too), the number of training examples and their contents: all of them for an
    ``(inputs, targets)`` pair of tensors, the first :data:`CONTEXT_EXAMPLES` of a
    Dataset or DataLoader (so a change past those is not noticed)."""
    whole = isinstance(train, tuple | list | Mapping)
    data = fingerprint(
        *tree_flatten(
            as_tensors(train, "train")
            if whole
            else next(iter_batches(train, CONTEXT_EXAMPLES, "train"))
        )[0]
    )
    task_key = {k: v for k, v in task.to_dict().items() if k != "measurement"}  # fits never use it
    return {
        "task": task_key,
        "model": fingerprint(*model.state_dict().values()),
        "n_train": num_examples(train, "train"),
        "train": data,
    }


class InfluenceFunction(Estimator):
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
        notes: entries added to :meth:`settings` (e.g. how the curvature was chosen).
    """

    method = "influence"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        curvature: Curvature,
        *,
        chunk_size: int = 64,
        query_chunk: int = 256,
        query_batch: int | None = None,
        progress: ProgressFn | None = None,
        notes: dict[str, Any] | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(task, Task):
            raise TypeError(f"task: expected a headwater Task, got {type(task).__name__}")
        if not isinstance(curvature, Curvature):
            raise TypeError(
                f"curvature: expected a headwater Curvature, got {type(curvature).__name__}"
            )
        for arg, value in (("chunk_size", chunk_size), ("query_chunk", query_chunk)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{arg}: must be a positive integer, got {value!r}")
        if query_batch is not None and (
            isinstance(query_batch, bool) or not isinstance(query_batch, int) or query_batch <= 0
        ):
            raise ValueError(
                f"query_batch: must be a positive integer or None, got {query_batch!r}"
            )
        self.model, self.task, self.curvature = model, task, curvature
        self.chunk_size, self.query_chunk, self.progress = chunk_size, query_chunk, progress
        self.query_batch = query_batch
        self.notes = dict(notes or {})
        self._blocks_complete: bool | None = None  # layer-wise gradients are whole (checked once)
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

    def fit(
        self, train: DataLike, *, store: str | os.PathLike | None = None, read_only: bool = False
    ) -> InfluenceFunction:
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
        self._blocks_complete = None
        context = fit_context(self.model, self.task, train) if store is not None else None

        def load() -> None:
            self.curvature.load(
                store, layout=ParamLayout.of(self.task.parameters(self.model)), context=context
            )
            if self.curvature.solve_streams_data:  # CG, LiSSA: re-attach the data's operator
                self.curvature.bind(self.model, self.task, train)
            report(self.progress, "curvature (loaded)", 1, 1)

        def note(what: str) -> None:
            self.store_status = f"curvature {what}"

        cached(
            store,
            load,
            lambda: self.curvature.fit(self.model, self.task, train, progress=self.progress),
            lambda _: self.curvature.save(store, context=context),
            read_only=read_only,
            note=note,
        )
        return self

    def _grads(self, data: DataLike, objective: Objective, name: str):
        return per_example_gradients(
            self.model,
            self.task,
            data,
            objective=objective,
            chunk_size=self.chunk_size,
            name=name,
            progress=self.progress,
        )

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
        for batch in iter_batches(
            query, self.query_chunk, "query"
        ):  # raw gradients: one tile at a time
            grads = torch.cat(
                list(
                    per_example_gradients(
                        self.model,
                        self.task,
                        batch,
                        objective=Objective.MEASUREMENT,
                        chunk_size=self.chunk_size,
                        name="query",
                    )
                )
            )
            solved = self.curvature.solve(grads)
            if left is None:
                left = solved.new_empty(n_query, solved.shape[1])
            left[row : row + solved.shape[0]] = solved
            row += solved.shape[0]
            report(self.progress, "gradients (query)", row, n_query)
        return left

    def scores(self, query: DataLike, train: DataLike) -> Tensor:
        """All scores ``[n_query, n_train]``. With K-FAC/EK-FAC they are computed module by
        module (:class:`~headwater.methods.factored.BlockFeatures`), never flattening the
        model; the numbers are the same."""
        batched = self._by_query_batch(query, lambda batch: (self.scores(batch, train),))
        if batched is not None:
            return batched[0]
        return self._all(query, train)

    def top_k(
        self, query: DataLike, train: DataLike, k: int, *, largest: bool = True
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` largest (proponents) or smallest (opponents) scores per query:
        ``(values, indices)``, each ``[n_query, k]``, streamed over the training data
        (under ``torch.distributed``: each rank's best of its shard, then merged)."""
        return self._sides(query, train, k, (largest,))[0]

    def extremes(
        self, query: DataLike, train: DataLike, k: int
    ) -> tuple[tuple[Tensor, Tensor], ...]:
        """The proponents (``k`` largest) and the opponents (``k`` smallest) from one pass."""
        return self._sides(query, train, k, (True, False))

    def _sides(
        self, query: DataLike, train: DataLike, k: int, sides: tuple[bool, ...]
    ) -> tuple[tuple[Tensor, Tensor], ...]:
        check_top_k(k)
        batched = self._by_query_batch(
            query,
            lambda batch: tuple(t for pair in self._sides(batch, train, k, sides) for t in pair),
        )
        if batched is not None:
            return tuple((batched[2 * s], batched[2 * s + 1]) for s in range(len(sides)))
        return self._best(query, train, k, sides)

    def attribute(
        self,
        query: DataLike,
        train: DataLike,
        *,
        top_k: int | None = None,
        self_influence: bool = False,
    ) -> Scores:
        """As :meth:`Estimator.attribute <headwater.methods.estimator.Estimator.attribute>`.

        The scores (or the proponents and opponents) and the self-influence come from one
        pass over the training gradients: each chunk is scored against the queries and
        dotted with its own preconditioned gradient. The numbers are those of the separate
        methods. Curvatures whose solve streams over the data (CG, LiSSA) and several query
        batches (``query_batch``) make the passes separately."""
        fused = (
            self_influence
            and not self.curvature.solve_streams_data
            and (self.query_batch is None or num_examples(query, "query") <= self.query_batch)
        )
        if not fused:
            return super().attribute(query, train, top_k=top_k, self_influence=self_influence)
        ref = next(iter(self.task.parameters(self.model).values()))
        sink = [torch.empty(0, dtype=ref.dtype, device=ref.device)]  # this rank's self-influence
        if top_k is None:
            result = Scores(self._all(query, train, self_sink=sink))
        else:
            (values, indices), (low, low_indices) = self._best(
                query, train, top_k, (True, False), self_sink=sink
            )
            result = Scores(values, indices, opponent_values=low, opponent_indices=low_indices)
        return dataclasses.replace(
            result, self_influence=gather_columns(torch.cat(sink).unsqueeze(0))[0]
        )

    def _all(
        self, query: DataLike, train: DataLike, *, self_sink: list[Tensor] | None = None
    ) -> Tensor:
        """The one tiled loop (:mod:`~headwater.methods.scoring`) over the curvature's
        features: every score ``[n_query, n_train]``."""
        left, chunks, _, n_local = self._features(query, train, self_sink)
        return gather_columns(pairwise(left, chunks, n_local, query_chunk=self.query_chunk))

    def _best(
        self,
        query: DataLike,
        train: DataLike,
        k: int,
        sides: tuple[bool, ...],
        *,
        self_sink: list[Tensor] | None = None,
    ) -> tuple[tuple[Tensor, Tensor], ...]:
        """The same loop, streamed: for each side (``True``: the ``k`` largest scores,
        ``False``: the ``k`` smallest) ``(values, indices)``, each ``[n_query, k]``."""
        left, chunks, start, n_local = self._features(query, train, self_sink)
        return tuple(
            sharded_extremes(
                left,
                chunks,
                k,
                n_train=num_examples(train, "train"),
                start=start,
                n_local=n_local,
                sides=sides,
                query_chunk=self.query_chunk,
            )
        )

    def _features(
        self, query: DataLike, train: DataLike, self_sink: list[Tensor] | None
    ) -> tuple[FeatureLike, Iterable[FeatureLike], int, int]:
        """Preconditioned query features, this rank's training feature chunks (each chunk's
        self-influence appended to ``self_sink``), the shard's first global index and size."""
        if self._block_features(train):
            curvature = self.curvature
            check_block_curvature(self.model, self.task, curvature)
            left = preconditioned_blocks(
                self.model,
                self.task,
                curvature,
                query,
                chunk_size=self.chunk_size,
                progress=self.progress,
            )
            start, stop = shard_range(num_examples(train, "train"))
            chunks = train_blocks(
                self.model,
                self.task,
                curvature,
                train,
                chunk_size=self.chunk_size,
                progress=self.progress,
                self_sink=self_sink,
            )
            return left, chunks, start, stop - start
        left = self.preconditioned_queries(query)
        grads, start, n_local = self._shard_grads(train)
        return (
            left,
            (grads if self_sink is None else teed(grads, self_sink, self._self_dots)),
            start,
            n_local,
        )

    def _block_features(self, train: DataLike) -> bool:
        """Whether to score block by block: the curvature declares it
        (``Curvature.block_features``, K-FAC/EK-FAC) and the hooked layer gradients are the
        whole gradients (:func:`~headwater.methods.layer_products.layer_blocks`, checked once
        per estimator); else the flat path with ``vmap`` gradients."""
        if not self.curvature.block_features:
            return False
        if self._blocks_complete is None:
            try:
                layer_blocks(self.model, self.task, train)
                self._blocks_complete = True
            except ValueError:
                self._blocks_complete = False
        return self._blocks_complete

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
        return {
            "method": "influence",
            **self.curvature.settings(),
            **self.curvature.scoring_settings(),
            "fitted_damping": self.curvature.fitted_damping,
            **self.curvature.fit_notes,
            "task": self.task.to_dict(),
            "chunk_size": self.chunk_size,
            "query_batch": self.query_batch,
            **self.notes,
            **({"store": self.store_status} if self.store_status else {}),
        }
