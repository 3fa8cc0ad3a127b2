"""Identity curvature: plain gradient similarity, ``score = ∇m(q)·∇ℓ(i)``.

``M`` is replaced by the identity: ``solve(v) = matvec(v) = v``. The damping is
**ignored** (``fitted_damping`` reports 1: the matrix used is ``0·M + 1·I``), so
scores are the raw dot products, comparable across damping settings; only their
scale, not their ranking, differs from ``(λI)⁻¹`` for any ``λ > 0``. Nothing is
streamed at fit time and nothing is stored but this convention.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from headwater.curvature.base import Curvature, Memory, ProblemSize
from headwater.data import DataLike
from headwater.progress import ProgressFn
from headwater.task import Task

__all__ = ["Identity", "IdentityState"]


@dataclass(frozen=True)
class IdentityState:
    """Attributes: damping: always 1.0 (the identity)."""

    damping: float = 1.0


class Identity(Curvature):
    """``(M + λI)⁻¹ ≈ I``: gradient similarity (see the module docstring; damping ignored)."""

    name = "identity"

    @classmethod
    def memory(cls, size: ProblemSize) -> Memory:
        """nothing"""
        return Memory(0, 0, "gradient similarity")

    @classmethod
    def _state_type(cls) -> type:
        return IdentityState

    def _fit(
        self, model: nn.Module, task: Task, data: DataLike, progress: ProgressFn | None
    ) -> IdentityState:
        return IdentityState()

    def _solve(self, v: Tensor) -> Tensor:
        return v.clone()

    def _matvec(self, v: Tensor) -> Tensor:
        return v.clone()
