"""Influence in a randomly projected gradient space (the sketch behind TRAK and LoGra).

    φ(z) = Π ∇f(z)                       (k numbers per example, Π seeded, see RandomProjection)
    K    = Π (M + λI) Πᵀ                  ([k, k]; M the GGN or empirical Fisher of the mean objective)
    score[q, i] = φ_m(z_q)ᵀ K⁻¹ φ_ℓ(z_i)

With ``k = P`` (and ``Π`` invertible) this is exactly the influence function of
:class:`~headwater.methods.influence.InfluenceFunction`; with ``k < P`` the inverse
is taken within a random ``k``-dimensional subspace (in the metric of ``M + λI``),
and the error falls as ``k`` grows (tested: relative error 0.65, 0.38, 0.15, 0 at
``k`` = 12, 25, 40, 51 = P on a tiny MLP). Projecting the damping with the rest
(``λ Π Πᵀ``, not ``λ I``) is what makes ``k = P`` exact.

Memory is ``O(chunk·P + k²)`` plus the projected training gradients ``[n, k]``,
which can live on disk in a resumable :class:`~headwater.store.rows.RowStore`:
they are computed once and every later batch of queries only needs its own
gradients. ``M`` in the projected space:

- ``kind="ef"``: ``(1/n) Σ_i φ_ℓ(z_i) φ_ℓ(z_i)ᵀ`` — free, from the stored features (TRAK's kernel);
- ``kind="ggn"``: ``(1/n) Σ_i Σ_c (Π J_iᵀ r_ic)(Π J_iᵀ r_ic)ᵀ`` with ``r_ic`` the columns of
  a square root of the loss's output Hessian (``ggn_estimator="exact"``, C gradient
  passes) or targets sampled from the model (``"sampled"``: the true Fisher,
  ``mc_samples`` passes); ``"auto"`` is exact up to 64 outputs per example.

Both add ``Π (λ_wd I) Πᵀ`` for the task's weight decay.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from headwater import store as store_mod
from headwater.curvature.base import check_damping, default_damping
from headwater.curvature.kfac import GGNEstimator, output_cotangents
from headwater.curvature.operators import MatrixKind
from headwater.data import DataLike, iter_batches, num_examples, take
from headwater.distributed import (
    all_reduce_sum_,
    gather_columns,
    local_batches,
    shard_range,
    world,
)
from headwater.errors import check_finite_rows
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import bind, detached, evaluation_mode, prepare_batch
from headwater.gradients.layers import DiagonalPart, capture, find_blocks
from headwater.gradients.per_example import (
    Objective,
    check_batch,
    check_values,
    output_pullbacks,
    per_example_gradients,
)
from headwater.gradients.projection import KroneckerProjection, RandomProjection
from headwater.methods.estimator import Estimator
from headwater.methods.influence import fit_context
from headwater.methods.scoring import Scores, pairwise, sharded_extremes, teed
from headwater.progress import ProgressFn, report
from headwater.store.cached import cached
from headwater.store.rows import RowStore
from headwater.task import Task

__all__ = ["ProjectedInfluence"]

log = logging.getLogger("headwater.store")


class _FlatFeatures:
    """``Π g`` from flat per-example gradients (``vmap(grad)``)."""

    def __init__(self, model: nn.Module, task: Task, projection: RandomProjection):
        self.model, self.task, self.projection = model, task, projection
        self.layout = ParamLayout.of(detached(task.parameters(model)))
        if projection.dim > self.layout.num_params:
            raise ValueError(
                f"projection: {projection.dim} dimensions exceed the {self.layout.num_params} "
                "analysed parameters (the projected curvature would be singular)"
            )
        self.dim = projection.dim

    def add_gram_(self, matrix: Tensor, alpha: Callable[[float], float]) -> None:
        """``matrix += alpha(trace(Π Πᵀ)) · Π Πᵀ`` in place (``Π Πᵀ`` formed once)."""
        gram = self.projection.gram(self.layout.num_params).to(matrix.device)
        matrix.add_(gram, alpha=alpha(float(gram.trace())))

    def features(self, batch: tuple[Tensor, Tensor], objective: Objective, name: str) -> Tensor:
        (g,) = per_example_gradients(
            self.model,
            self.task,
            batch,
            objective=objective,
            chunk_size=batch[0].shape[0],
            name=name,
        )
        return self.projection(g)

    def pullbacks(
        self, params: dict[str, Tensor], x: Tensor, cotangents_of
    ) -> tuple[float, list[Tensor]]:
        """``(w, [Π J_iᵀ c_k(z_i) for each cotangent k])`` for one chunk."""
        with torch.no_grad():
            out = self.task.output(bind(self.model, params), x)
        weight, cotangents = cotangents_of(out)
        pullback = output_pullbacks(self.model, self.task, params)
        return weight, [self.projection(pullback(x, c)) for c in cotangents]


class _KroneckerFeatures:
    """``Σ_t (P_out s_t)(P_in ã_t)ᵀ`` per layer from one batched forward/backward with
    hooks (the per-example gradient is never formed), concatenated over layers."""

    def __init__(self, model: nn.Module, task: Task, projection: KroneckerProjection):
        self.model, self.task, self.projection = model, task, projection
        params = detached(task.parameters(model))
        self.blocks = find_blocks(model, params)
        self.diagonal = DiagonalPart(model, task, self.blocks, params)
        self.dtype = next(iter(params.values())).dtype
        device = next(iter(params.values())).device
        self.factors = [
            tuple(f.to(device) for f in projection.factors(j, b.out_features, b.width, self.dtype))
            for j, b in enumerate(self.blocks)
        ]
        self.dim = sum(po.shape[0] * pi.shape[0] for po, pi in self.factors)

    def add_gram_(self, matrix: Tensor, alpha: Callable[[float], float]) -> None:
        """``matrix += alpha(trace(Π Πᵀ)) · Π Πᵀ`` in place, block by block (``Π Πᵀ`` is block
        diagonal with ``(P_out P_outᵀ) ⊗ (P_in P_inᵀ)`` per layer, never formed whole; its
        trace is ``Σ ‖P_out‖²‖P_in‖²``)."""
        norms = [float(po.double().norm() * pi.double().norm()) for po, pi in self.factors]
        scale, start = alpha(sum(norm**2 for norm in norms)), 0
        for po, pi in self.factors:
            block = torch.kron(po.double() @ po.double().T, pi.double() @ pi.double().T)
            rows = slice(start, start + block.shape[0])
            matrix[rows, rows] += scale * block.to(matrix.device)
            start += block.shape[0]

    def _project(
        self, signals: dict[str, Tensor], acts: dict[str, Tensor], batch_size: int
    ) -> Tensor:
        """``signals {module: [..., B, T, out]}``, ``acts {module: [B, T, width]}`` -> ``[..., B, dim]``."""
        parts = []
        for b, (po, pi) in zip(self.blocks, self.factors, strict=True):
            if acts[b.module].shape[0] != batch_size:
                raise ValueError(
                    f"projection: module {b.module!r} is not called once per example (its input's "
                    "first dimension is not the batch, e.g. a position embedding on arange(T)); "
                    "leave it out with the task's modules="
                )
            s, a = signals[b.module] @ po.T, acts[b.module] @ pi.T
            parts.append(torch.einsum("...bto,bti->...boi", s, a).flatten(-2))
        return torch.cat(parts, dim=-1)

    def features(self, batch: tuple[Tensor, Tensor], objective: Objective, name: str) -> Tensor:
        params = detached(self.task.parameters(self.model))
        x, y = prepare_batch(batch, next(iter(params.values())))
        value_fn = self.task.train_loss if objective is Objective.TRAIN else self.task.measurement
        live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad(), capture(self.model, self.blocks) as cap:
            values = value_fn(bind(self.model, live), (x, y))
        check_values(values, y.shape[0], name)
        with torch.enable_grad():
            signals = {**cap.signals(values.sum()), **self.diagonal.gradients((x, y), value_fn)}
        acts = {**cap.activations(), **self.diagonal.activations(y.shape[0], values)}
        return self._project(signals, acts, y.shape[0])

    def pullbacks(
        self, params: dict[str, Tensor], x: Tensor, cotangents_of
    ) -> tuple[float, list[Tensor]]:
        live = {k: v.detach().requires_grad_(True) for k, v in params.items()}
        with torch.enable_grad(), capture(self.model, self.blocks) as cap:
            out = self.task.output(bind(self.model, live), x)
        weight, cotangents = cotangents_of(out)
        with torch.enable_grad():
            signals = {**cap.pullback(out, cotangents), **self.diagonal.pullback(x, cotangents)}
        acts = {**cap.activations(), **self.diagonal.activations(out.shape[0], out)}
        return weight, list(self._project(signals, acts, out.shape[0]))


class ProjectedInfluence(Estimator):
    """Influence functions on randomly projected gradients.

    Args:
        model: the trained model (never modified).
        task: loss, measurement and analysed parameters.
        projection: a :class:`RandomProjection`, or ``k`` for a Rademacher one with ``seed``.
        kind: ``"ggn"`` (default) or ``"ef"``.
        damping: λ ≥ 0; ``None``: ``1e-3 × trace(Π M Πᵀ) / trace(Π Πᵀ)`` (≈ 1e-3 × trace(M)/P,
            ``M`` with the weight decay).
        ggn_estimator: ``"auto"``, ``"exact"`` or ``"sampled"`` (see the module docstring).
        mc_samples: sampled targets per example for ``"sampled"``.
        seed: seed of the projection (when ``projection`` is an int) and of sampled targets.
        store: optional base path: projected training gradients (``<store>-train``,
            resumable by chunk; they depend on the projection, the model and the data
            only, see :func:`~headwater.methods.influence.fit_context`) and the
            projected curvature (``<store>-curvature``; also on ``kind`` and the
            estimator) are written there and reused by a later run that matches
            (else ``StoreMismatchError`` naming what differs). Damaged rows or a damaged
            curvature are recomputed after one warning line.
        read_only: raise ``StoreError`` for a damaged store instead of recomputing it.
        chunk_size, query_chunk: examples per gradient step / query rows per scoring tile.
        progress: optional ``progress(stage, done, total)`` callback.
    """

    method = "influence"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        projection: RandomProjection | KroneckerProjection | int,
        *,
        kind: MatrixKind | str = MatrixKind.GGN,
        damping: float | None = None,
        ggn_estimator: GGNEstimator | str = GGNEstimator.AUTO,
        mc_samples: int = 1,
        seed: int = 0,
        store: str | os.PathLike | None = None,
        read_only: bool = False,
        chunk_size: int = 64,
        query_chunk: int = 256,
        progress: ProgressFn | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(task, Task):
            raise TypeError(f"task: expected a headwater Task, got {type(task).__name__}")
        if isinstance(projection, int) and not isinstance(projection, bool):
            projection = RandomProjection(projection, seed=seed)
        if not isinstance(projection, RandomProjection | KroneckerProjection):
            raise TypeError(
                "projection: expected a positive int, a RandomProjection or a KroneckerProjection, "
                f"got {projection!r}"
            )
        self.kind = MatrixKind(kind)
        if self.kind is MatrixKind.HESSIAN:
            raise ValueError("kind: the projected curvature supports 'ggn' and 'ef', not 'hessian'")
        self.estimator = GGNEstimator(ggn_estimator)
        for arg, value in (
            ("mc_samples", mc_samples),
            ("chunk_size", chunk_size),
            ("query_chunk", query_chunk),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{arg}: must be a positive integer, got {value!r}")
        self.model, self.task, self.projection = model, task, projection
        self.damping, self.mc_samples, self.seed = check_damping(damping), mc_samples, seed
        self.store, self.read_only = None if store is None else store_mod.prefix(store), read_only
        self.store_status: dict[str, str] = {}  # what fit() did with each store, one line each
        self.chunk_size, self.query_chunk, self.progress = chunk_size, query_chunk, progress
        params = detached(task.parameters(model))
        self.layout = ParamLayout.of(params)
        self.dtype, self.device = (
            next(iter(params.values())).dtype,
            next(iter(params.values())).device,
        )
        self._featurizer = (
            _FlatFeatures(model, task, projection)
            if isinstance(projection, RandomProjection)
            else _KroneckerFeatures(model, task, projection)
        )
        self.dim = self._featurizer.dim
        self._features: RowStore | Tensor | None = None  # this rank's rows
        self._n = self._start = self._n_local = (
            0  # all training examples; this rank's first one and count
        )
        self._chol: Tensor | None = None
        self.fitted_damping: float | None = None

    def settings(self) -> dict[str, Any]:
        return {
            "method": "influence",
            "curvature": "projected",
            "projection": self._projection_settings(),
            "kind": self.kind.value,
            "damping": self.damping,
            "fitted_damping": self.fitted_damping,
            "ggn_estimator": self.estimator.value,
            "mc_samples": self.mc_samples,
            "seed": self.seed,
            "task": self.task.to_dict(),
            "chunk_size": self.chunk_size,
            **({"store": dict(self.store_status)} if self.store_status else {}),
        }

    def _projection_settings(self) -> dict[str, Any]:
        return {"type": type(self.projection).__name__, **self.projection.settings()}

    def _row_key(self, train: DataLike) -> dict[str, Any]:
        """What the stored training rows depend on: the projection, the model, the data
        (:func:`~headwater.methods.influence.fit_context`) and this rank's shard."""
        context = fit_context(self.model, self.task, train)
        # neither the rows nor the stored Π M Πᵀ hold the weight decay (added at fit time)
        context["task"] = {k: v for k, v in context["task"].items() if k != "weight_decay"}
        return {
            "projection": self._projection_settings(),
            "num_params": self.layout.num_params,
            "shard": [self._start, self._start + self._n_local],
            **context,
        }

    def _curvature_key(self, row_key: dict[str, Any]) -> dict[str, Any]:
        """The rows' key and how ``M`` is formed (the damping is added later, not stored)."""
        sampled = self.kind is MatrixKind.GGN and self.estimator is not GGNEstimator.EXACT
        return {
            **row_key,
            "kind": self.kind.value,
            **({"ggn_estimator": self.estimator.value} if self.kind is MatrixKind.GGN else {}),
            **({"mc_samples": self.mc_samples, "seed": self.seed} if sampled else {}),
        }

    # ------------------------------------------------------------------ fitting
    def _path(self, suffix: str) -> Path | None:
        """``<store>-<suffix>``; under ``torch.distributed`` one file per rank."""
        if self.store is None:
            return None
        rank, size = world()
        return self.store.with_name(
            f"{self.store.name}-{suffix}" + (f"-rank{rank}of{size}" if size > 1 else "")
        )

    def fit(self, train: DataLike) -> ProjectedInfluence:
        """Project every training gradient and form ``K``; resumes from ``store``.

        Under ``torch.distributed`` each rank projects its shard of ``train``
        (:func:`~headwater.distributed.shard`) and keeps those rows; the sums forming
        ``K`` are all-reduced, so every rank holds the same ``K``."""
        n = num_examples(train, "train")
        self._n, (self._start, stop) = n, shard_range(n)
        self._n_local = stop - self._start
        row_key = self._row_key(train) if self.store is not None else {}
        features = self._train_features(train, row_key)
        curvature_path = self._path("curvature")
        # every rank loads, or every rank computes: the sum below is collective
        key = self._curvature_key(row_key)

        def load() -> dict[str, Tensor]:
            report(self.progress, "projected curvature (loaded)", 1, 1)
            return store_mod.load(curvature_path, expect=key)[0]

        def compute() -> dict[str, Tensor]:
            total = self._ef(features) if self.kind is MatrixKind.EF else self._ggn(train)
            all_reduce_sum_(total)
            return {"mean": total.div_(n)}

        def note(what: str) -> None:
            self.store_status["curvature"] = what

        mean = cached(
            curvature_path,
            load,
            compute,
            lambda t: store_mod.save(curvature_path, t, key),
            per_rank=True,
            read_only=self.read_only,
            note=note,
        )["mean"].to(self.device)
        # in place: at k = 10⁴ every [k, k] float64 copy is 0.8 GB
        matrix = mean  # already saved (if stored): free to modify
        curvature_trace, weight_decay = float(mean.trace()), self.task.weight_decay

        def weight_decay_plus_damping(gram_trace: float) -> float:
            # the default: relative to trace(K + wd·Π Πᵀ) / trace(Π Πᵀ)
            damping = self.damping
            if damping is None:
                damping = default_damping(curvature_trace / gram_trace + weight_decay)
            self.fitted_damping = float(damping)
            return weight_decay + damping

        self._featurizer.add_gram_(matrix, weight_decay_plus_damping)
        damping = self.fitted_damping
        del mean
        chol, info = torch.linalg.cholesky_ex(matrix)  # reads the lower triangle only
        if int(info) != 0:
            raise ValueError(
                f"damping: the projected curvature is not positive definite with damping={damping}; "
                "increase it (or use fewer projected dimensions than training examples)"
            )
        self._chol, self._features = chol, features
        return self

    def _train_features(self, train: DataLike, key: dict[str, Any]) -> RowStore | Tensor:
        """This rank's projected training gradients ``[n_local, k]``, resuming a partial store."""
        rows, path, n_local = None, self._path("train"), self._n_local
        if path is not None:  # every rank opens (or is refused) together, empty shards too
            dtype = self.dtype if self.dtype in (torch.float32, torch.float64) else torch.float32
            rows = store_mod.on_every_rank(
                lambda: (
                    RowStore(path, (n_local, self.dim), dtype, key, read_only=self.read_only)
                    if n_local > 0
                    else None
                ),
                path,
            )
            if rows is not None:
                self.store_status["train"] = rows.status
                log.info("projected training gradients: %s", rows.status)
                if rows.complete:
                    return rows
        out: list[Tensor] = [torch.zeros(0, self.dim, dtype=self.dtype, device=self.device)]
        done = 0
        for batch in local_batches(train, self.chunk_size, "train"):
            size = batch[1].shape[0]
            skip = 0 if rows is None else max(0, min(size, rows.rows_done - done))
            if skip < size:
                if done == 0:
                    check_batch(self.model, self.task, batch, "train")
                with evaluation_mode(self.model):
                    phi = self._featurizer.features(
                        (take(batch[0], slice(skip, None)), batch[1][skip:]),
                        Objective.TRAIN,
                        "train",
                    )
                check_finite_rows(
                    phi, what="projected gradient", name="train", offset=self._start + done + skip
                )
                if rows is None:
                    out.append(phi)
                else:
                    rows.append(phi)
            done += size
            report(self.progress, "projected gradients (train)", done, n_local)
        return rows if rows is not None else torch.cat(out)

    def _feature_chunks(self, features: RowStore | Tensor):
        if isinstance(features, RowStore):
            yield from (
                c.to(device=self.device, dtype=self.dtype)
                for c in features.chunks(max(self.chunk_size, 1024))
            )
        else:
            yield features

    def _ef(self, features: RowStore | Tensor) -> Tensor:
        """``Σ_i φ_i φ_iᵀ`` over this rank's rows (a sum; divided by the global n later)."""
        total = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        for phi in self._feature_chunks(features):
            phi = phi.double()
            total.addmm_(phi.T, phi)
        return total

    def _ggn(self, train: DataLike) -> Tensor:
        """``Σ_i Σ_c ψ_ic ψ_icᵀ``, ``ψ_ic = Π J_iᵀ r_ic``, over this rank's examples (see the
        module docstring; a sum, divided by the global n later)."""
        params = detached(self.task.parameters(self.model))
        total = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)

        def cotangents_of(out: Tensor) -> tuple[float, Tensor]:
            estimator = self.estimator.resolve(out[0].numel())
            return output_cotangents(
                self.task,
                out,
                y,
                MatrixKind.GGN,
                estimator,
                self.seed,
                self._start + done,
                self.mc_samples,
            )

        done = 0
        with evaluation_mode(self.model):
            for batch in local_batches(train, self.chunk_size, "train"):
                x, y = prepare_batch(batch, next(iter(params.values())))
                weight, projected = self._featurizer.pullbacks(params, x, cotangents_of)
                psi = torch.cat(
                    projected
                )  # [K·B, k]: one product in the model's dtype, summed in float64
                total.add_(psi.T @ psi, alpha=weight)  # in place, float64 sum
                done += y.shape[0]
                report(self.progress, "projected GGN", done, self._n_local)
        return total

    # ------------------------------------------------------------------ scoring
    def _check_fitted(self) -> None:
        if self._chol is None or self._features is None:
            raise RuntimeError("ProjectedInfluence: call fit(train) first")

    def preconditioned_queries(self, query: DataLike) -> Tensor:
        """``K⁻¹ φ_m(z_q)`` for every query, ``[n_query, k]``."""
        self._check_fitted()
        check_batch(
            self.model,
            self.task,
            next(iter_batches(query, 1, "query")),
            "query",
            Objective.MEASUREMENT,
        )
        with evaluation_mode(self.model):
            phi = torch.cat(
                [
                    self._featurizer.features(batch, Objective.MEASUREMENT, "query")
                    for batch in iter_batches(query, self.chunk_size, "query")
                ]
            ).double()
        check_finite_rows(phi, what="projected gradient", name="query")
        return torch.cholesky_solve(phi.T, self._chol).T.to(self.dtype)

    def scores(self, query: DataLike, train: DataLike | None = None) -> Tensor:
        """All scores ``[n_query, n_train]`` (``train`` is only checked: the projected
        training gradients of :meth:`fit` are used; under ``torch.distributed`` each
        rank scores its rows and every rank returns all columns)."""
        return self.attribute(query, train).values

    def top_k(
        self, query: DataLike, train: DataLike | None, k: int, *, largest: bool = True
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` largest (or smallest) scores per query: ``(values, indices)``."""
        return self.extremes(query, train, k, sides=(largest,))[0]

    def extremes(
        self,
        query: DataLike,
        train: DataLike | None,
        k: int,
        *,
        sides: tuple[bool, ...] = (True, False),
        self_sink: list[Tensor] | None = None,
    ) -> list[tuple[Tensor, Tensor]]:
        """:meth:`top_k` for several sides (default: proponents and opponents) in one pass over
        this rank's stored features (each chunk's self-influence appended to ``self_sink``)."""
        left = self.preconditioned_queries(query)
        return sharded_extremes(
            left,
            self._chunks(train, self_sink),
            k,
            n_train=self._n,
            start=self._start,
            n_local=self._features.shape[0],
            sides=sides,
            query_chunk=self.query_chunk,
        )

    def attribute(
        self,
        query: DataLike,
        train: DataLike | None,
        *,
        top_k: int | None = None,
        self_influence: bool = False,
    ) -> Scores:
        """As :meth:`Estimator.attribute`, the self-influence from the same pass over the
        stored training features as the scores."""
        sink = [torch.zeros(0, dtype=self.dtype, device=self.device)] if self_influence else None
        if top_k is None:
            left = self.preconditioned_queries(query)
            result = Scores(
                gather_columns(
                    pairwise(
                        left,
                        self._chunks(train, sink),
                        self._features.shape[0],
                        query_chunk=self.query_chunk,
                    )
                )
            )
        else:
            (values, indices), (low, low_indices) = self.extremes(
                query, train, top_k, self_sink=sink
            )
            result = Scores(values, indices, opponent_values=low, opponent_indices=low_indices)
        si = None if sink is None else gather_columns(torch.cat(sink).unsqueeze(0))[0]
        return dataclasses.replace(result, self_influence=si)

    def _chunks(self, train: DataLike | None, self_sink: list[Tensor] | None) -> Iterable[Tensor]:
        """This rank's stored training features chunk by chunk (each chunk's self-influence
        appended to ``self_sink`` if given)."""
        self._check_train(train)
        chunks = self._feature_chunks(self._features)
        return chunks if self_sink is None else teed(chunks, self_sink, self._self_dots)

    def _self_dots(self, phi: Tensor) -> Tensor:
        """``φᵢᵀ K⁻¹ φᵢ`` for each row of a chunk ``[B, k]``."""
        solved = torch.cholesky_solve(phi.double().T, self._chol).T
        return (solved * phi.double()).sum(dim=1).to(self.dtype)

    def self_influence(self, train: DataLike | None = None) -> Tensor:
        """``φ_ℓ(z_i)ᵀ K⁻¹ φ_ℓ(z_i)`` for every training example."""
        self._check_train(train)
        out = [torch.zeros(0, dtype=self.dtype, device=self.device)]
        out += [self._self_dots(phi) for phi in self._feature_chunks(self._features)]
        return gather_columns(torch.cat(out).unsqueeze(0))[0]

    def _check_train(self, train: DataLike | None) -> None:
        self._check_fitted()
        if train is not None and num_examples(train, "train") != self._n:
            raise ValueError(
                f"train: fitted on {self._n} training examples, got {num_examples(train, 'train')}"
            )
