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
from headwater.curvature._matfree import CHUNK_SIZE
from headwater.curvature.base import Memory, ProblemSize
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
    kinds = (MatrixKind.GGN, MatrixKind.EF)

    @classmethod
    def memory(cls, size: ProblemSize) -> Memory:
        """stored 8·rank·P; working + 16·(rank + oversample)·P (sketch)"""
        return Memory(8 * size.rank * size.num_params, 16 * (size.rank + 10) * size.num_params,
                      f"rank {size.rank}")

    def __init__(
        self,
        *,
        kind: MatrixKind | str = MatrixKind.GGN,
        damping: float | None = None,
        chunk_size: int = CHUNK_SIZE,
        rank: int = 50,
        oversample: int = 10,
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
        if isinstance(oversample, bool) or not isinstance(oversample, int) or oversample < 0:
            raise ValueError(f"oversample: must be an integer >= 0, got {oversample!r}")
        self.oversample = oversample

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

    def settings(self) -> dict[str, Any]:
        return {**super().settings(), "oversample": self.oversample}
