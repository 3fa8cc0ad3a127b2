"""Exact dense curvature: the full ``P × P`` matrix, eigendecomposed once in float64."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headwater.curvature._matfree import warn_if_indefinite
from headwater.curvature.base import Curvature, Memory, ProblemSize, default_damping
from headwater.curvature.operators import dense_curvature
from headwater.data import DataLike
from headwater.progress import ProgressFn
from headwater.task import Task

__all__ = ["Exact", "ExactState"]

_MATRICES_HELD = 3  # the matrix, its float64 copy and the eigenvectors


def _memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


@dataclass(frozen=True)
class ExactState:
    eigvals: Tensor  # [P] float64, undamped, ascending ([0] with the Cholesky solver)
    eigvecs: Tensor  # [P, P] float64, columns; with the Cholesky solver: L, M + λI = L Lᵀ
    damping: float


class Exact(Curvature):
    """The dense Hessian, GGN or empirical Fisher, ``M = QΛQᵀ``; ``solve`` applies
    ``Q (Λ + λ)⁻¹ Qᵀ``. Exact, and the oracle for every approximation.

    With ``solver="cholesky"`` the damped matrix is factored ``M + λI = L Lᵀ`` instead
    (float64; about 25x fewer operations than the eigendecomposition, which dominates
    the fit past a few thousand parameters): the same ``solve`` and ``matvec``, no
    ``eigen()``. The damping default ``DEFAULT_RELATIVE_DAMPING × trace(M)/P`` is the
    same for both.

    Args:
        solver: ``"eigh"`` (default; keeps the eigendecomposition) or ``"cholesky"``.
        max_params: refuse models with more analysed parameters than this; the
            default is what half the machine's memory holds (three float64
            ``P × P`` matrices).
        (others as :class:`~headwater.curvature.base.Curvature`)

    Raises:
        ValueError: at fit, if ``P > max_params``, naming the approximations to use.
    """

    name = "exact"
    has_eigen = True

    @property
    def damping_in_state_only(self) -> bool:  # type: ignore[override]
        """Eigenvalues hold λ only as a value; a Cholesky factor of ``M + λI`` must be refitted."""
        return self.solver == "eigh"

    @classmethod
    def memory(cls, size: ProblemSize) -> Memory:
        """stored 8·(P² + P) (float64 eigenvectors, eigenvalues); working + 8·P² (the matrix)"""
        p = size.num_params
        return Memory(8 * (p * p + p), 8 * p * p)

    def __init__(
        self,
        *,
        kind="ggn",
        damping=None,
        chunk_size=64,
        max_params: int | None = None,
        solver: str = "eigh",
    ):
        super().__init__(kind=kind, damping=damping, chunk_size=chunk_size)
        if solver not in ("eigh", "cholesky"):
            raise ValueError(f"solver: expected 'eigh' or 'cholesky', got {solver!r}")
        self.solver = solver
        if max_params is None:
            max_params = int((_memory_bytes() / 2 / (8 * _MATRICES_HELD)) ** 0.5)
        if not isinstance(max_params, int) or max_params <= 0:
            raise ValueError(f"max_params: must be a positive integer, got {max_params!r}")
        self.max_params = max_params

    @classmethod
    def _state_type(cls) -> type:
        return ExactState

    def _fit(
        self, model: nn.Module, task: Task, data: DataLike, progress: ProgressFn | None
    ) -> ExactState:
        p = self.layout.num_params
        if p > self.max_params:
            gib = _MATRICES_HELD * 8 * p * p / 2**30
            raise ValueError(
                f"curvature='exact': {p:,} analysed parameters need ~{gib:,.1f} GiB for dense "
                f"P x P matrices (max_params={self.max_params:,}). Use curvature='ekfac', 'kfac', "
                f"'cg', 'lissa', 'arnoldi', 'lanczos', 'nystrom', 'diagonal' or 'identity', or "
                f"select fewer modules (Task(modules=...))."
            )
        matrix = dense_curvature(
            model, task, data, self.kind, chunk_size=self.chunk_size, progress=progress
        ).to(torch.float64)
        damping = self.damping
        if damping is None:
            damping = default_damping(
                float(matrix.diagonal().mean())
            )  # trace(M)/P: the mean eigenvalue
        if self.solver == "cholesky":
            matrix.diagonal().add_(damping)
            factor, info = torch.linalg.cholesky_ex(matrix)
            if int(info) == 0:
                return ExactState(matrix.new_empty(0), factor.contiguous(), float(damping))
            warnings.warn(
                f"curvature='exact' ({self.kind.value}): the damped matrix is not positive "
                "definite; falling back to the eigendecomposition.",
                RuntimeWarning,
                stacklevel=3,
            )
            matrix.diagonal().sub_(damping)
        eigvals, eigvecs = torch.linalg.eigh(matrix)
        warn_if_indefinite("exact", self.kind, float(eigvals[0]), damping)
        return ExactState(eigvals.contiguous(), eigvecs.contiguous(), float(damping))

    def _spectral(self, v: Tensor, power: int) -> Tensor:
        s = self.state
        if s.eigvals.numel() == 0:  # Cholesky factor L of M + λI
            rhs = v.to(torch.float64).T  # [P, K]
            out = (
                torch.cholesky_solve(rhs, s.eigvecs)
                if power < 0
                else s.eigvecs @ (s.eigvecs.T @ rhs)
            )
            return out.T.to(v.dtype)
        coeff = (v.to(torch.float64) @ s.eigvecs) * (s.eigvals + s.damping) ** power
        return (coeff @ s.eigvecs.T).to(v.dtype)

    def _solve(self, v: Tensor) -> Tensor:
        return self._spectral(v, -1)

    def _matvec(self, v: Tensor) -> Tensor:
        return self._spectral(v, 1)

    def settings(self) -> dict:
        return {**super().settings(), "solver": self.solver}

    def eigen(self) -> tuple[Tensor, Tensor]:
        self._check_fitted()
        if self.state.eigvals.numel() == 0:
            raise NotImplementedError(
                "Exact(solver='cholesky') keeps no eigendecomposition; use solver='eigh'"
            )
        return self.state.eigvals.flip(0), self.state.eigvecs.T.flip(0)
