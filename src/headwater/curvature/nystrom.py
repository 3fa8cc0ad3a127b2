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

from headwater.curvature._lowrank import DEFAULT_POWER_ITERS, LowRankCurvature, LowRankState
from headwater.curvature.base import Memory, ProblemSize
from headwater.curvature.operators import MatrixKind
from headwater.curvature.solvers import MatVec, nystrom

__all__ = ["DEFAULT_POWER_ITERS", "LowRankState", "Nystrom"]


class Nystrom(LowRankCurvature):
    """``M ≈ U diag(l) Uᵀ`` from a randomized Nyström sketch (GGN or empirical Fisher).

    Exact when ``rank = P``. State: ``eigvals [k]``, ``eigvecs [k, P]``, ``damping``.

    Args:
        rank: eigenpairs kept.
        oversample: extra sketch columns (``>= 0``); the sketch holds
            ``min(rank + oversample, P)`` vectors, pushed through one batched product.
        power_iters: subspace iterations before the sketch (:data:`DEFAULT_POWER_ITERS`),
            each one more batched product.
        (others as :class:`~headwater.curvature._lowrank.LowRankCurvature`)

    Raises:
        ValueError: ``kind="hessian"`` (the sketch needs a positive semi-definite ``M``).
    """

    name = "nystrom"
    option = "oversample"
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
        self,
        matvec: MatVec,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        ranks: tuple[int, ...],
        threshold: float,
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        for rank in ranks:  # a new sketch per rank: each is only 1 + power_iters products
            self.rank = rank
            eigvals, eigvecs = nystrom(
                matvec,
                dim,
                rank=rank,
                seed=self.seed,
                oversample=self.oversample,
                power_iters=self.power_iters,
                dtype=dtype,
                device=device,
            )
            if float(eigvals.abs().min()) <= threshold:
                break
        return eigvals, eigvecs, {}

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "power_iters": self.power_iters}
