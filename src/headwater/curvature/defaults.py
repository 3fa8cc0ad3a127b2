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
  Nyström's sketch, whose kept eigenvalues underestimate the top of the spectrum, takes
  :data:`NYSTROM_RELATIVE_DAMPING` = 10 instead: the factor chosen on the even-numbered test
  digits of the MLP and CNN together (grid 0.003-30, ``python -m bench.defaults heldout``),
  LDS on the odd ones 0.594 (MLP) and 0.441 (CNN) against 0.601 and 0.352 at factor 1.
- ``"factored"`` (K-FAC/EK-FAC): the scale is each block's mean eigenvalue
  ``mean(Λ_b)`` (Kronfluence's heuristic), factor 0.1. EK-FAC's LDS is flat over
  factors 1e-3-0.3 of that scale (MLP 0.572-0.574, CNN 0.357-0.364) and falls with a
  damping as large as the dense solve's (CNN: 0.316 at 3 × trace/P).

M-FAC's trace of its window of gradients (``"full"``) takes :data:`MFAC_RELATIVE_DAMPING` =
0.1 instead of 3: the held-out choice above picked 0.03 × 3 = 0.09 (LDS on the odd test
digits 0.538 / 0.374 for the MLP / CNN against 0.478 / 0.360 at 3 × trace/P); its rank-m
window leaves most directions to the damping alone, which then needs to be small.
"""

from __future__ import annotations

from enum import Enum

__all__ = [
    "DEFAULT_RELATIVE_DAMPING",
    "FACTORED_RELATIVE_DAMPING",
    "LOWRANK_RELATIVE_DAMPING",
    "MFAC_RELATIVE_DAMPING",
    "NYSTROM_RELATIVE_DAMPING",
    "DampingScale",
    "default_damping",
]

DEFAULT_RELATIVE_DAMPING = 3.0
"""``"full"`` factor: damping = this × the mean eigenvalue ``trace(M)/P``."""

LOWRANK_RELATIVE_DAMPING = 1.0
"""``"lowrank"`` factor: damping = this × the smallest kept ``|eigenvalue|``."""

NYSTROM_RELATIVE_DAMPING = 10.0
"""Nyström's ``"lowrank"`` factor: damping = this × the smallest kept sketch eigenvalue."""

MFAC_RELATIVE_DAMPING = 0.1
"""M-FAC's ``"full"`` factor: damping = this × the window's ``trace(F)/P``."""

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
