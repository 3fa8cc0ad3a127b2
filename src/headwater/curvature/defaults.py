"""The one default-damping rule: ``λ = factor × the curvature's own scale``.

The damping stands in for what the approximation does not resolve, measured in the
curvature's own units, so every approximation lands on comparable values (within a
small factor of each other on the same model) without tuning:

- ``"full"`` (exact, CG, LiSSA, diagonal, M-FAC, a projected dense matrix): the scale is
  the mean eigenvalue ``trace(M)/P`` (with the weight decay), factor
  :data:`DEFAULT_RELATIVE_DAMPING` = 3. Chosen on held-out test points (bench/defaults.py:
  the factor with the best mean LDS over the even-numbered test digits, reported on the
  odd ones): the dense GGN on the digits CNN, factors 0.03-10 → 0.394, 0.407, 0.434,
  0.464, 0.468, 0.431 (LDS over all 200; the former 1e-3 gave 0.39); on the digits MLP
  the rank-100 Arnoldi, closest to the dense solve, peaks at 2.4-4.8 × trace/P.
- ``"lowrank"`` (Arnoldi, Lanczos, Nyström): the scale is the smallest kept
  eigenvalue ``|l_k|`` (an upper bound of the discarded spectrum), factor 1. Measured
  (MLP, rank 100): LDS 0.718, the best tuned row (0.718 at λ = 0.006); CNN rank 50:
  0.460, best 0.46; the trace rule gave 0.445 (MLP, rank 50) at any factor <= 0.3.
- ``"factored"`` (K-FAC/EK-FAC): the scale is each block's mean eigenvalue
  ``mean(Λ_b)`` (Kronfluence's heuristic), factor 0.1. EK-FAC's LDS is flat over
  factors 1e-3-0.3 of that scale (MLP 0.572-0.574, CNN 0.357-0.364) and falls with a
  damping as large as the dense solve's (CNN: 0.316 at 3 × trace/P).
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "DEFAULT_RELATIVE_DAMPING",
    "FACTORED_RELATIVE_DAMPING",
    "LOWRANK_RELATIVE_DAMPING",
    "DampingScale",
    "default_damping",
]

DEFAULT_RELATIVE_DAMPING = 3.0
"""``"full"`` factor: damping = this × the mean eigenvalue ``trace(M)/P``."""

LOWRANK_RELATIVE_DAMPING = 1.0
"""``"lowrank"`` factor: damping = this × the smallest kept ``|eigenvalue|``."""

FACTORED_RELATIVE_DAMPING = 0.1
"""``"factored"`` factor: damping of a block = this × its mean eigenvalue."""


class DampingScale(str, Enum):
    """Which scale of the curvature the default damping is relative to."""

    FULL = "full"  # trace(M)/P with the weight decay
    LOWRANK = "lowrank"  # the smallest kept |eigenvalue|
    FACTORED = "factored"  # the block's mean eigenvalue (without the weight decay)


_FACTORS = {
    DampingScale.FULL: DEFAULT_RELATIVE_DAMPING,
    DampingScale.LOWRANK: LOWRANK_RELATIVE_DAMPING,
    DampingScale.FACTORED: FACTORED_RELATIVE_DAMPING,
}


def default_damping(
    scale: float, kind: DampingScale | str = DampingScale.FULL, factor: float | None = None
) -> float:
    """The default damping ``factor × max(scale, 0)``; ``factor`` defaults to the kind's
    (see the module docs)."""
    factor = _FACTORS[DampingScale(kind)] if factor is None else factor
    return float(factor) * max(float(scale), 0.0)
