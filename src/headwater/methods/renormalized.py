"""Renormalized influence functions (Hammoudeh & Lowd 2022) on any curvature.

Influence estimators over-weight training examples with large gradients (high
loss): ``∇m(q)ᵀ(M + λI)⁻¹∇ℓ(i)`` grows with ``‖∇ℓ(i)‖``, so a few badly fit
examples dominate every query's ranking while low-loss examples that the query
really depends on — e.g. a poisoning attack's instances, fit perfectly by
construction — are pushed down (their "low-loss penalty"). Renormalisation
divides each training gradient by its norm *before* the product:

    score[q, i] = ∇m(z_q)ᵀ (M + λI)⁻¹ ∇ℓ(z_i) / ‖∇ℓ(z_i)‖

which is what Hammoudeh & Lowd's renormalized influence function computes (their
code divides the flattened training gradient by its Euclidean norm and leaves
``(M + λI)⁻¹∇m(q)`` as it is). Two variants are offered beside it:

* ``norm="layer"`` — layerwise renormalisation (their LayerGAS idea applied to the
  static estimator): each layer's block of ``∇ℓ(z_i)`` is made a unit vector,
  ``ĝ_i = [g_i^(1)/‖g_i^(1)‖, …, g_i^(L)/‖g_i^(L)‖]``, then
  ``score = ∇m(z_q)ᵀ(M + λI)⁻¹ ĝ_i``. A layer is the set of parameters that belong
  to one module (``fc.weight`` and ``fc.bias`` form layer ``fc``).
* ``norm="curvature"`` — divide by the curvature-weighted norm
  ``‖∇ℓ(z_i)‖_{(M+λI)⁻¹} = √(∇ℓ(z_i)ᵀ(M + λI)⁻¹∇ℓ(z_i))``, the square root of the
  self-influence (the "relative influence" of Barshan et al. 2020, RelatIF, in its
  θ-relative form). Not in Hammoudeh & Lowd; offered for comparison.

With ``normalize_query=True`` the query gradient is normalised the same way (for
``"curvature"``: by ``√(∇m(q)ᵀ(M + λI)⁻¹∇m(q))``), which makes scores comparable
across queries; then with ``norm="curvature"`` every score is a cosine in the
``(M + λI)⁻¹`` inner product and lies in ``[−1, 1]``. It never changes the order of
training examples within one query.

Sign and scale (headwater's convention): the sign is the influence function's:
positive = proponent (with the loss as measurement, removing ``z_i`` raises the
query's loss), negative = opponent. The magnitude is *not* a removal effect:
``score[q, i] / n`` approximates the change in ``m(z_q)`` from removing ``z_i`` per
unit of its gradient norm, i.e. the effect ``z_i`` would have if its gradient kept
its direction but had norm 1 — a measure of direction, not of size.

Reference: Z. Hammoudeh & D. Lowd, "Identifying a Training-Set Attack's Target
Using Renormalized Influence Estimation", ACM CCS 2022.
"""

from __future__ import annotations

from collections.abc import Iterator
from enum import Enum
from typing import Any

import torch
from torch import Tensor

from headwater.data import DataLike, num_examples
from headwater.gradients.flat import ParamLayout
from headwater.gradients.per_example import Objective, per_example_gradients
from headwater.methods.estimator import Estimator
from headwater.methods.influence import InfluenceFunction
from headwater.methods.scoring import pairwise, pairwise_top_k

__all__ = ["Renormalization", "RenormalizedInfluence", "layer_slices"]

_TINY = 1e-30


class Renormalization(str, Enum):
    """Which norm each training gradient is divided by."""

    GRADIENT = "gradient"  # ‖∇ℓ_i‖₂ (Hammoudeh & Lowd's renormalized influence function)
    LAYER = "layer"  # each layer's block to unit norm (layerwise renormalisation)
    CURVATURE = "curvature"  # ‖∇ℓ_i‖ in the (M + λI)⁻¹ metric (RelatIF-style)


def layer_slices(layout: ParamLayout) -> dict[str, list[slice]]:
    """Flat-vector slices of each layer: parameters grouped by their owning module.

    ``{"fc1": [slice(weight), slice(bias)], ...}``; a parameter registered on the
    root module (no dot in its name) forms the layer ``""``.
    """
    groups: dict[str, list[slice]] = {}
    for name, sl in layout.slices().items():
        groups.setdefault(name.rpartition(".")[0], []).append(sl)
    return groups


class RenormalizedInfluence(Estimator):
    """Renormalized influence scores ``[n_query, n_train]`` (see the module docstring
    for the formula, what the score approximates and its sign).

    Args:
        influence: an :class:`~headwater.methods.influence.InfluenceFunction` whose
            curvature is fitted (any approximation: ``Exact``, ``EKFAC``, ``CG``, ...);
            its model, task, chunk sizes and progress callback are used.
        norm: ``"gradient"`` (default, the paper's), ``"layer"`` or ``"curvature"``.
        normalize_query: also normalise each query gradient (scores comparable
            across queries; the order within a query is unchanged).

    Raises:
        TypeError / ValueError naming the argument; ``RuntimeError`` if the
        curvature is not fitted.
    """

    method = "renormalized_influence"

    def __init__(
        self,
        influence: InfluenceFunction,
        *,
        norm: Renormalization | str = Renormalization.GRADIENT,
        normalize_query: bool = False,
    ):
        if not isinstance(influence, InfluenceFunction):
            raise TypeError(
                f"influence: expected a headwater InfluenceFunction, got {type(influence).__name__}"
            )
        try:
            self.norm = Renormalization(norm)
        except ValueError as err:
            raise ValueError(
                f"norm: expected one of {[r.value for r in Renormalization]}, got {norm!r}"
            ) from err
        if not isinstance(normalize_query, bool):
            raise TypeError(
                f"normalize_query: expected a bool, got {type(normalize_query).__name__}"
            )
        if influence.curvature.state is None:
            raise RuntimeError(
                "influence: its curvature is not fitted; call influence.fit(train) first"
            )
        self.influence = influence
        self.normalize_query = normalize_query
        self._layers = layer_slices(influence.curvature.layout)

    # -- normalisation -------------------------------------------------------------
    def _unit(self, g: Tensor) -> Tensor:
        """``g [B, P]`` with every row (or every layer block of a row) divided by its norm."""
        if self.norm is Renormalization.GRADIENT:
            return g / g.norm(dim=1, keepdim=True).clamp_min(_TINY)
        if self.norm is Renormalization.LAYER:
            out = torch.empty_like(g)
            for slices in self._layers.values():
                block = torch.cat([g[:, sl] for sl in slices], dim=1)  # [B, P_layer]
                scale = block.norm(dim=1, keepdim=True).clamp_min(_TINY)
                for sl in slices:
                    out[:, sl] = g[:, sl] / scale
            return out
        quad = (self.influence.curvature.solve(g) * g).sum(dim=1, keepdim=True)  # [B, 1]
        if (quad < 0).any():
            raise ValueError(
                "norm: 'curvature' needs a positive definite curvature (found gᵀ(M+λI)⁻¹g < 0); "
                "use kind='ggn' or more damping"
            )
        return g / quad.sqrt().clamp_min(_TINY)

    def _grads(self, data: DataLike, objective: Objective, name: str) -> Iterator[Tensor]:
        inf = self.influence
        return per_example_gradients(
            inf.model,
            inf.task,
            data,
            objective=objective,
            chunk_size=inf.chunk_size,
            name=name,
            progress=inf.progress,
        )

    def _train_grads(self, train: DataLike) -> Iterator[Tensor]:
        for g in self._grads(train, Objective.TRAIN, "train"):  # [B, P]
            yield self._unit(g)

    def preconditioned_queries(self, query: DataLike) -> Tensor:
        """``(M + λI)⁻¹ ∇m(z_q)`` (normalised first if ``normalize_query``), ``[n_query, P]``."""
        solve = self.influence.curvature.solve
        rows = []
        for g in self._grads(query, Objective.MEASUREMENT, "query"):  # [B, P]
            rows.append(solve(self._unit(g) if self.normalize_query else g))
        return torch.cat(rows)

    # -- scores --------------------------------------------------------------------
    def scores(self, query: DataLike, train: DataLike) -> Tensor:
        """All renormalized scores ``[n_query, n_train]``, streamed over the training data."""
        left = self.preconditioned_queries(query)
        return pairwise(
            left,
            self._train_grads(train),
            num_examples(train, "train"),
            query_chunk=self.influence.query_chunk,
        )

    def top_k(
        self, query: DataLike, train: DataLike, k: int, *, largest: bool = True
    ) -> tuple[Tensor, Tensor]:
        """The ``k`` largest (proponents) or smallest (opponents) renormalized scores per
        query: ``(values, indices)``, each ``[n_query, k]``."""
        left = self.preconditioned_queries(query)
        return pairwise_top_k(
            left,
            self._train_grads(train),
            k,
            largest=largest,
            query_chunk=self.influence.query_chunk,
        )

    def settings(self) -> dict[str, Any]:
        return {
            **self.influence.settings(),
            "method": "renormalized_influence",
            "norm": self.norm.value,
            "normalize_query": self.normalize_query,
        }
