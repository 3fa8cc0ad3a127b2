"""Nyström: a randomized low-rank sketch of a positive semi-definite curvature.

``M ≈ (MΩ)(ΩᵀMΩ)⁺(MΩ)ᵀ`` from one batched product with a seeded Gaussian test
matrix Ω ``[P, rank + oversample]`` (Tropp et al. 2017; Frangella, Tropp & Udell
2021, "Randomized Nyström Preconditioning"). The residual form of ``solve`` is
the Nyström sketch-and-solve ``U(Λ+λ)⁻¹Uᵀv + (v − UUᵀv)/λ``; the same sketch
preconditions :class:`~headwater.curvature.cg.CG`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from headwater.curvature._lowrank import LowRankCurvature, LowRankState
from headwater.curvature.base import Memory, ProblemSize
from headwater.curvature.defaults import NYSTROM_RELATIVE_DAMPING
from headwater.curvature.operators import MatrixKind
from headwater.curvature.solvers import MatVec, nystrom

__all__ = ["LowRankState", "Nystrom"]


class Nystrom(LowRankCurvature):
    """``M ≈ U diag(l) Uᵀ`` from a randomized Nyström sketch (GGN or empirical Fisher).

    Exact when ``rank = P``. State: ``eigvals [k]``, ``eigvecs [k, P]``, ``damping``.

    Args:
        rank: eigenpairs kept.
        oversample: extra sketch columns (``>= 0``); the sketch holds
            ``min(rank + oversample, P)`` vectors, pushed through one batched product.
        (others as :class:`~headwater.curvature._lowrank.LowRankCurvature`)

    Raises:
        ValueError: ``kind="hessian"`` (the sketch needs a positive semi-definite ``M``).
    """

    name = "nystrom"
    option = "oversample"
    damping_factor = NYSTROM_RELATIVE_DAMPING  # held-out choice (curvature.defaults)
    kinds = (MatrixKind.GGN, MatrixKind.EF)

    @classmethod
    def memory(cls, size: ProblemSize) -> Memory:
        """stored 8·rank·P; working + 16·(rank + oversample)·P (sketch)"""
        return Memory(
            8 * size.rank * size.num_params,
            16 * (size.rank + 10) * size.num_params,
            f"rank {size.rank}",
        )

    def _decompose(
        self, matvec: MatVec, dim: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        eigvals, eigvecs = nystrom(
            matvec,
            dim,
            rank=self.rank,
            seed=self.seed,
            oversample=self.oversample,
            dtype=dtype,
            device=device,
        )
        return eigvals, eigvecs, {}
