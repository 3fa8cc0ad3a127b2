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
  eigenvalue ``|l_k|`` (an upper bound of the discarded spectrum), factor 1, and the
  damping is never below the dense solve's default ``3 × trace/P`` (a Hutchinson
  estimate, as CG's). With no ``rank`` given the rank is 100, doubled to 200 while
  ``l_k`` is above that damping (the kept pairs should resolve every direction the
  damping does not dominate). Measured (bench/lowrank_rule.md, Arnoldi): on the digits MLP
  170 eigenvalues lie above 3 × trace/P = 0.0037, and rank 100 / 200 / 300 give LDS
  0.718 / 0.741 / 0.745 (more Krylov steps at rank 100: no change); on the CNN 79 do,
  rank 100 is kept and the floor raises 0.462 to 0.468 (rank 200 at ``l_k``: 0.449, at the
  floor: 0.468). The floor was kept by its LDS on the even-numbered test digits of both
  (MLP rank 200 0.737 + CNN rank 100 0.473, against 0.739 + 0.464 at ``l_k`` alone); on
  the odd ones 0.740 and 0.464. Nyström uses the same rule with two subspace iterations, without which its
  sketch's eigenvalues are too small for the rank test (``nystrom.DEFAULT_POWER_ITERS``).
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
    "DampingScale",
    "default_damping",
]

DEFAULT_RELATIVE_DAMPING = 3.0
"""``"full"`` factor: damping = this × the mean eigenvalue ``trace(M)/P``."""

LOWRANK_RELATIVE_DAMPING = 1.0
"""``"lowrank"`` factor: damping = this × the smallest kept ``|eigenvalue|``."""

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
