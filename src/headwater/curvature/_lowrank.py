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
from headwater.curvature.operators import MatrixKind
from headwater.curvature.solvers import MatVec, lowrank_solve
from headwater.data import DataLike
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = ["DEFAULT_RANK", "LowRankCurvature", "LowRankState"]

DEFAULT_RANK = 100
"""Eigenpairs kept by default (at most the number of analysed parameters)."""


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
        rank: number of eigenpairs kept, ``k >= 1``; ``None`` (default): ``min(100, P)``
            (:data:`DEFAULT_RANK`; on the digits MLP rank 100 with the default damping
            reaches the best tuned LDS, 0.718, where rank 50 gives 0.675: bench/defaults.py).
        residual: ``False`` for the paper's truncated inverse (discarded directions
            contribute zero), ``True`` (default) to treat the discarded subspace with
            the damping, ``(v − UUᵀv)/(μ + λ)``; needs ``μ + λ > 0``.
        seed: seed of the random start vector / sketch and of the trace probes.
        trace_probes: unused since the default damping is the smallest kept eigenvalue
            (:mod:`~headwater.curvature.defaults`); kept so that settings and stores match.
        n_iter: Krylov steps of Arnoldi and Lanczos (``rank <= n_iter <= P``); default
            ``min(P, 2·rank)``. Too few steps collapse quality: the kept pairs must converge.
        oversample: Nyström's extra sketch columns (``>= 0``).
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
        for arg, given in (("n_iter", n_iter is not None), ("oversample", oversample != 10)):
            if given and arg != self.option:
                raise ValueError(
                    f"{arg}: not a setting of {type(self).__name__} (its own is {self.option!r})"
                )
        if n_iter is not None and (
            isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < rank
        ):
            raise ValueError(f"n_iter: must be an integer >= rank ({rank}), got {n_iter!r}")
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
            raise ValueError(f"oversample: must be an integer >= 0, got {oversample!r}")
        self.n_iter, self.oversample = n_iter, oversample

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
        self, matvec: MatVec, dim: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        """``(eigvals [k], eigvecs [k, P], extra state fields)`` of the operator."""

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

        eigvals, eigvecs, extra = self._decompose(counted, p, op.dtype, op.device)
        damping = self.damping
        if damping is None:  # the rule of headwater.curvature.defaults
            if eigvals.numel() == p:  # the whole space: the trace is exact
                damping = default_damping(float(eigvals.double().sum()) / p)
            else:  # the discarded spectrum lies below the smallest kept eigenvalue
                damping = rule(
                    float(eigvals.abs().min()), DampingScale.LOWRANK, self.damping_factor
                )
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
