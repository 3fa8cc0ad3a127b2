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

from headwater.curvature._lowrank import (
    LowRankCurvature,
    LowRankState,
    krylov_stop,
    stopped_rank,
)
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
    option = "n_iter"

    def _decompose(
        self,
        matvec: MatVec,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        ranks: tuple[int, ...],
        threshold: float,
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        self.rank = ranks[-1]
        eigvals, eigvecs, self.info = arnoldi(
            matvec,
            dim,
            n_iter=self._steps(dim),
            top_k=self.rank,
            seed=self.seed,
            dtype=dtype,
            device=device,
            stop=krylov_stop(ranks, threshold),
        )
        self.rank = stopped_rank(ranks, self.info.iterations)
        return eigvals[: self.rank], eigvecs[: self.rank], {}
