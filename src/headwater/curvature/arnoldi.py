"""Arnoldi: the top-k eigenpairs of the curvature, gradients projected onto them.

Schioppa, Zablotskaia, Vilar & Sokolov 2022, "Scaling Up Influence Functions":
run ``n_iter`` Arnoldi steps on ``M``-vector products from a seeded start vector,
keep the ``k`` Ritz pairs of largest ``|λ|``, and score in the ``k``-dimensional
eigenbasis. See :mod:`headwater.curvature._lowrank` for the truncated (paper) and
residual inverses.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from headwater.curvature._lowrank import LowRankCurvature, LowRankState
from headwater.curvature._matfree import CHUNK_SIZE
from headwater.curvature.base import Memory, ProblemSize
from headwater.curvature.operators import MatrixKind
from headwater.curvature.solvers import MatVec, arnoldi

__all__ = ["Arnoldi", "LowRankState"]


class Arnoldi(LowRankCurvature):
    """``M ≈ U diag(l) Uᵀ`` from Arnoldi iteration (Schioppa et al. 2022, Algorithm 1).

    ``solve(v)`` is ``U diag(1/(l+λ)) Uᵀ v`` (``residual=False``, the paper) or that
    plus ``(v − UUᵀv)/λ`` (``residual=True``, default). State: ``eigvals [k]``,
    ``eigvecs [k, P]``, ``damping``; saved and loaded through the store.

    Args:
        rank: eigenpairs kept (the paper's ``p``), by ``|λ|``.
        n_iter: Arnoldi steps (``rank <= n_iter <= P``); default ``min(P, 2·rank)``.
            Too few steps collapse quality: the kept pairs must converge.
        (others as :class:`~headwater.curvature._lowrank.LowRankCurvature`)

    Memory: the Krylov basis, ``n_iter·P`` float64 numbers, during the fit.
    """

    name = "arnoldi"

    @classmethod
    def memory(cls, size: ProblemSize) -> Memory:
        """stored 8·rank·P; working + 8·n_iter·P (Krylov basis)"""
        return Memory(8 * size.rank * size.num_params, 8 * size.n_iter * size.num_params,
                      f"rank {size.rank}, {size.n_iter} iterations")

    def __init__(
        self,
        *,
        kind: MatrixKind | str = MatrixKind.GGN,
        damping: float | None = None,
        chunk_size: int = CHUNK_SIZE,
        rank: int = 50,
        n_iter: int | None = None,
        residual: bool = True,
        seed: int = 0,
        trace_probes: int = 16,
    ):
        super().__init__(
            kind=kind,
            damping=damping,
            chunk_size=chunk_size,
            rank=rank,
            residual=residual,
            seed=seed,
            trace_probes=trace_probes,
        )
        if n_iter is not None and (
            isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < rank
        ):
            raise ValueError(f"n_iter: must be an integer >= rank ({rank}), got {n_iter!r}")
        self.n_iter = n_iter

    def _decompose(
        self, matvec: MatVec, dim: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        n_iter = min(dim, 2 * self.rank) if self.n_iter is None else self.n_iter
        if n_iter > dim:
            raise ValueError(
                f"n_iter: must be <= the number of analysed parameters ({dim}), got {n_iter}"
            )
        eigvals, eigvecs, self.info = arnoldi(
            matvec, dim, n_iter=n_iter, top_k=self.rank, seed=self.seed, dtype=dtype, device=device
        )
        return eigvals, eigvecs, {}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "n_iter": self.n_iter}
