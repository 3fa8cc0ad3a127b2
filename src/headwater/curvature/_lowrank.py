"""The shared part of the low-rank curvatures (Arnoldi, Lanczos, Nyström).

Each fits ``M ≈ U diag(l) Uᵀ`` (``U`` orthonormal, ``[P, k]``; stored as rows
``eigvecs [k, P]``) from ``M``-vector products and then applies

    truncated (``residual=False``, Schioppa et al. 2022):
        solve(v) = U diag(1/(l + λ)) Uᵀ v
    residual (``residual=True``; the discarded subspace gets the damping plus the
    known floor of the spectrum, ``μ`` = the task's weight decay for the GGN/EF,
    which are PSD + weight decay, and 0 for the Hessian):
        solve(v) = U diag(1/(l + λ)) Uᵀ v + (v − U Uᵀ v)/(μ + λ)

``matvec(v) = U diag(l) Uᵀ v + μ (v − U Uᵀ v) + λ v`` in the residual form and
``U diag(l) Uᵀ v + λ v`` in the truncated one (there ``solve`` is its inverse
restricted to ``span U``). For influence the gradients
can be projected once, ``project(g) = g U`` ``[n, k]``; in the truncated form
``q·solve(g) = project(q) diag(1/(l + λ)) project(g)ᵀ``.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from headwater.curvature._matfree import (
    CHUNK_SIZE,
    BoundOperator,
    warn_if_indefinite,
)
from headwater.curvature.base import Curvature, Memory, ProblemSize, default_damping
from headwater.curvature.defaults import LOWRANK_RELATIVE_DAMPING, DampingScale
from headwater.curvature.defaults import default_damping as rule
from headwater.curvature.eigensolvers import StopRule
from headwater.curvature.operators import MatrixKind
from headwater.curvature.solvers import MatVec, lowrank_solve
from headwater.data import DataLike
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = [
    "DEFAULT_POWER_ITERS",
    "DEFAULT_RANK",
    "MAX_DEFAULT_RANK",
    "LowRankCurvature",
    "LowRankState",
]

DEFAULT_RANK = 100
"""Eigenpairs kept by default (at most the number of analysed parameters)."""

DEFAULT_POWER_ITERS = 2
"""Subspace iterations before the sketch. The default rank rule (grow while the smallest
kept eigenvalue is above the damping) needs the sketch's eigenvalues to be right, and a
plain Gaussian sketch underestimates them: on the digits MLP its 100th eigenvalue is
0.00113, after one iteration 0.00353, after two 0.00721, against Arnoldi's 0.00837
(bench/lowrank_rule.md). Chosen with the rule on the even-numbered test digits of the MLP and
CNN together (LDS 0.738 + 0.468 with 2, 0.659 + 0.469 with 1); on the odd ones 0.739 and
0.456 (without iteration, the former defaults: 0.594 and 0.441)."""

MAX_DEFAULT_RANK = 200
"""With no ``rank`` given, the rank doubles from :data:`DEFAULT_RANK` up to this while the
smallest kept eigenvalue is above the damping (see :meth:`LowRankCurvature._ranks`)."""


@dataclass(frozen=True)
class LowRankState:
    """Fitted low-rank curvature.

    Attributes:
        eigvals: ``[k]`` undamped eigenvalues, by ``|λ|`` descending.
        eigvecs: ``[k, P]`` orthonormal eigenvectors (rows).
        damping: λ used by ``solve``/``matvec``.
        floor: ``μ``, the curvature assumed in the discarded subspace (residual form).
    """

    eigvals: Tensor
    eigvecs: Tensor
    damping: float
    floor: float = 0.0


class LowRankCurvature(Curvature):
    """Abstract: a rank-``k`` eigendecomposition of ``M`` from matrix-free products.

    Args:
        rank: number of eigenpairs kept, ``k >= 1``; ``None`` (default): 100
            (:data:`DEFAULT_RANK`), doubled to 200 (:data:`MAX_DEFAULT_RANK`) when the 100th
            eigenvalue is still above the damping (see :meth:`_ranks`), at most ``P``.
        residual: ``False`` for the paper's truncated inverse (discarded directions
            contribute zero), ``True`` (default) to treat the discarded subspace with
            the damping, ``(v − UUᵀv)/(μ + λ)``; needs ``μ + λ > 0``.
        seed: seed of the random start vector / sketch and of the trace probes.
        trace_probes: Hutchinson probes (seed ``seed + 1``) of ``trace(M)/P`` for the
            default damping's floor, the dense solve's default (:mod:`~headwater.curvature.defaults`).
        n_iter: Krylov steps of Arnoldi and Lanczos (``rank <= n_iter <= P``); default
            ``min(P, 2·rank)``. Too few steps collapse quality: the kept pairs must converge.
        oversample: Nyström's extra sketch columns (``>= 0``).
        power_iters: Nyström's subspace iterations before the sketch (``>= 0``); default
            :data:`DEFAULT_POWER_ITERS` (2).
        (others as :class:`~headwater.curvature.base.Curvature`)

    Memory: ``O(k·P)`` for the state plus the method's Krylov basis / sketch and one
    chunk of activations, independent of ``n_train``.
    """

    has_eigen = True
    damping_in_state_only = True
    damping_factor: ClassVar[float] = LOWRANK_RELATIVE_DAMPING
    """Default damping = this × the smallest kept ``|eigenvalue|`` (see ``curvature.defaults``)."""
    option: ClassVar[str]
    """The method's own setting: ``"n_iter"`` (Arnoldi, Lanczos) or ``"oversample"`` (Nyström);
    passing the other one raises."""

    def __init__(
        self,
        *,
        kind: MatrixKind | str = MatrixKind.GGN,
        damping: float | None = None,
        chunk_size: int = CHUNK_SIZE,
        rank: int | None = None,
        residual: bool = True,
        seed: int = 0,
        trace_probes: int = 16,
        n_iter: int | None = None,
        oversample: int = 10,
        power_iters: int | None = None,
    ):
        super().__init__(kind=kind, damping=damping, chunk_size=chunk_size)
        self.rank_given = rank  # None: DEFAULT_RANK, at most P (settled at fit)
        rank = DEFAULT_RANK if rank is None else rank
        for arg, value, low in (
            ("rank", rank, 1),
            ("seed", seed, 0),
            ("trace_probes", trace_probes, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{arg}: must be an integer >= {low}, got {value!r}")
        if not isinstance(residual, bool):
            raise TypeError(f"residual: expected a bool, got {type(residual).__name__}")
        self.rank, self.residual, self.seed, self.trace_probes = rank, residual, seed, trace_probes
        own = ("oversample", "power_iters") if self.option == "oversample" else ("n_iter",)
        for arg, given in (
            ("n_iter", n_iter is not None),
            ("oversample", oversample != 10),
            ("power_iters", power_iters is not None),
        ):
            if given and arg not in own:
                raise ValueError(
                    f"{arg}: not a setting of {type(self).__name__} (its own: {', '.join(own)})"
                )
        if n_iter is not None and (
            isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < rank
        ):
            raise ValueError(f"n_iter: must be an integer >= rank ({rank}), got {n_iter!r}")
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
            raise ValueError(f"oversample: must be an integer >= 0, got {oversample!r}")
        power_iters = DEFAULT_POWER_ITERS if power_iters is None else power_iters
        if isinstance(power_iters, bool) or not isinstance(power_iters, int) or power_iters < 0:
            raise ValueError(f"power_iters: must be an integer >= 0, got {power_iters!r}")
        self.n_iter, self.oversample, self.power_iters = n_iter, oversample, power_iters

    def _steps(self, dim: int) -> int:
        """The Krylov steps for an operator of size ``dim``: ``n_iter`` or ``min(dim, 2·rank)``."""
        n_iter = min(dim, 2 * self.rank) if self.n_iter is None else self.n_iter
        if n_iter > dim:
            raise ValueError(
                f"n_iter: must be <= the number of analysed parameters ({dim}), got {n_iter}"
            )
        return n_iter

    @classmethod
    def memory(cls, size: ProblemSize) -> Memory:
        """stored 8·rank·P; working + 8·n_iter·P (Krylov basis)"""
        return Memory(
            8 * size.rank * size.num_params,
            8 * size.n_iter * size.num_params,
            f"rank {size.rank}, {size.n_iter} iterations",
        )

    @classmethod
    def _state_type(cls) -> type:
        return LowRankState

    @abstractmethod
    def _decompose(
        self,
        matvec: MatVec,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        ranks: tuple[int, ...],
        threshold: float,
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """``(eigvals [k], eigvecs [k, P], extra state fields)`` of the operator, at the first
        of ``ranks`` whose smallest kept ``|eigenvalue|`` is ``<= threshold`` (else the last);
        sets ``self.rank`` to it."""

    def _ranks(self, dim: int) -> tuple[int, ...]:
        """The ranks to try: ``rank`` alone when it or ``n_iter`` is given, else
        100, 200 (:data:`DEFAULT_RANK` doubling up to :data:`MAX_DEFAULT_RANK`, at most ``dim``).

        The rule: the kept eigenpairs should resolve every direction of ``M`` above the
        damping (below it the damping dominates and the residual form's ``1/(μ + λ)`` is
        within a factor 2 of the exact inverse), so the rank grows while the smallest kept
        eigenvalue is above it. On the digits MLP (bench/lowrank_rule.md) 170 Ritz values
        lie above the dense solve's default damping: rank 100 gave LDS 0.718, 200 gave 0.741,
        300 gave 0.745; on the CNN 79 do and rank 100 is kept (200: no better).
        """
        ranks = [self.rank]
        if self.rank_given is None and self.n_iter is None:
            while 2 * ranks[-1] <= min(dim, MAX_DEFAULT_RANK):
                ranks.append(2 * ranks[-1])
        return tuple(ranks)

    def _fit(
        self, model: nn.Module, task: Task, data: DataLike, progress: ProgressFn | None
    ) -> Any:
        p = self.layout.num_params
        if self.rank_given is None:
            self.rank = min(DEFAULT_RANK, p)
        if self.rank > p:
            raise ValueError(
                f"rank: must be <= the number of analysed parameters ({p}), got {self.rank}"
            )
        op = BoundOperator(model, task, data, self.kind, self.chunk_size)
        self.fit_notes["curvature_product"] = op.product
        calls = [0]

        def counted(v: Tensor) -> Tensor:
            calls[0] += 1
            report(progress, f"{self.name} products", calls[0], calls[0])
            return op.matvec(v)

        full = self.damping  # the damping, or the dense solve's default one (as CG's)
        if full is None:
            full = op.default_damping(probes=self.trace_probes, seed=self.seed + 1)
        ranks = self._ranks(p)
        eigvals, eigvecs, extra = self._decompose(counted, p, op.dtype, op.device, ranks, full)
        smallest = float(eigvals.abs().min())
        if len(ranks) > 1:
            self.fit_notes["rank"] = (
                f"{self.rank} of {ranks}: smallest kept eigenvalue {smallest:.3g} "
                f"{'<=' if smallest <= full else '>'} damping {full:.3g}"
            )
        damping = self.damping
        if damping is None:  # the rule of headwater.curvature.defaults
            if eigvals.numel() == p:  # the whole space: the trace is exact
                damping = default_damping(float(eigvals.double().sum()) / p)
            else:  # the discarded spectrum lies below the smallest kept eigenvalue
                damping = max(rule(smallest, DampingScale.LOWRANK, self.damping_factor), full)
        floor = task.weight_decay if self.kind is not MatrixKind.HESSIAN else 0.0
        if self.residual and floor + damping <= 0:
            raise ValueError(
                "damping: must be > 0 with residual=True when the curvature has no positive floor "
                f"(weight decay {task.weight_decay:g}, kind={self.kind.value!r}); the discarded "
                "subspace is divided by it"
            )
        warn_if_indefinite(
            self.name, self.kind, float(eigvals.min()), damping, what="smallest kept eigenvalue"
        )
        return self._state_type()(
            eigvals=eigvals.contiguous(),
            eigvecs=eigvecs.contiguous(),
            damping=float(damping),
            floor=float(floor),
            **extra,
        )

    # -- reading -------------------------------------------------------------------
    def _solve(self, v: Tensor) -> Tensor:
        s = self.state
        x = lowrank_solve(s.eigvals, s.eigvecs, v, damping=s.damping, residual=False)
        if self.residual:
            u = s.eigvecs.to(v.dtype)  # [k, P]
            x = x + (v - (v @ u.T) @ u) / (s.floor + s.damping)
        return x

    def _matvec(self, v: Tensor) -> Tensor:
        s = self.state
        u = s.eigvecs.to(v.dtype)  # [k, P]
        coeff = v @ u.T  # [K, k]
        out = (coeff * s.eigvals.to(v.dtype)) @ u + s.damping * v
        if self.residual:
            out = out + s.floor * (v - coeff @ u)
        return out

    def project(self, g: Tensor) -> Tensor:
        """Coordinates of ``g [n, P]`` in the kept eigenbasis, ``g U`` ``[n, k]``.

        Project train and query gradients once; in the truncated form the score is
        ``project(q) diag(1/(l + λ)) project(g)ᵀ`` (see :meth:`inverse_eigvals`),
        ``O(k)`` per pair.
        """
        self._check_fitted()
        p = self.layout.num_params
        if not isinstance(g, Tensor) or g.shape[-1] != p or g.dim() not in (1, 2):
            raise ValueError(
                f"g: expected a Tensor of shape [n, {p}] or [{p}], got "
                f"{tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__}"
            )
        return g @ self.state.eigvecs.to(g.dtype).T

    def inverse_eigvals(self) -> Tensor:
        """``1/(l + λ)`` ``[k]``: the inverse in the projected coordinates."""
        self._check_fitted()
        return 1.0 / (self.state.eigvals + self.state.damping)

    def eigen(self) -> tuple[Tensor, Tensor]:
        """The kept eigenvalues ``[k]`` (by ``|λ|`` descending, undamped) and eigenvectors ``[k, P]``."""
        self._check_fitted()
        return self.state.eigvals, self.state.eigvecs

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "rank": self.rank_given,
            "residual": self.residual,
            "seed": self.seed,
            "trace_probes": self.trace_probes,
            self.option: getattr(self, self.option),
        }


def krylov_stop(ranks: tuple[int, ...], threshold: float) -> StopRule | None:
    """Arnoldi/Lanczos run ``2 × ranks[-1]`` steps at most and stop after ``2r`` steps for an
    earlier ``r`` of ``ranks`` when the ``r``-th largest ``|Ritz value|`` is ``<= threshold``
    (the steps of a longer run start as those of a shorter one: nothing is recomputed)."""
    if len(ranks) == 1:
        return None

    def rule(ritz: Tensor) -> bool:
        r = ritz.numel() // 2
        return float(ritz.abs().sort(descending=True).values[r - 1]) <= threshold

    return StopRule(tuple(2 * r for r in ranks[:-1]), rule)


def stopped_rank(ranks: tuple[int, ...], steps: int) -> int:
    """The rank a Krylov run of ``steps`` steps keeps: ``r`` if it stopped at ``2r`` for an
    earlier rank of ``ranks``, else the last (at most ``steps``)."""
    for r in ranks[:-1]:
        if steps == 2 * r:
            return r
    return min(ranks[-1], steps)
