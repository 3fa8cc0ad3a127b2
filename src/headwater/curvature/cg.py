"""Conjugate gradient: ``(M + λI)⁻¹ V`` from matrix-free products, no stored matrix.

Koh & Liang 2017 solve ``H⁻¹∇m`` by CG on Hessian-vector products; here any kind
(Hessian, GGN, empirical Fisher), batched over the right-hand sides, optionally
preconditioned by a randomized Nyström sketch (Frangella, Tropp & Udell 2021).

**CG needs the operator in the current process.** Its fitted state is small (the
damping and, if asked for, the preconditioner's eigenpairs), but every ``solve``
streams over the training data again, so the object keeps references to the
model, task and data from :meth:`CG.fit`. After :meth:`~headwater.curvature.base.Curvature.load`
call :meth:`CG.bind` with the same model, task and data before solving.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from headwater.curvature._matfree import (
    CHUNK_SIZE,
    extreme_eigenvalues,
    warn_if_indefinite,
)
from headwater.curvature._streaming import Preconditioner, StreamingCurvature
from headwater.curvature.base import Memory, ProblemSize
from headwater.curvature.operators import MatrixKind
from headwater.curvature.solvers import CGInfo, conjugate_gradient
from headwater.data import DataLike
from headwater.progress import ProgressFn
from headwater.task import Task

__all__ = ["CG", "CGState"]

_CHECK_STEPS = 20  # Lanczos steps for the indefiniteness check of a Hessian

_GUARD_ITERATIONS, _GUARD_ROWS = 5, 4  # the preconditioner check on the first solve


@dataclass(frozen=True)
class CGState:
    """Fitted CG: the damping and the optional Nyström preconditioner.

    Attributes:
        damping: λ.
        precond_eigvals: ``[r]`` sketch eigenvalues, or ``None`` without a preconditioner.
        precond_eigvecs: ``[r, P]`` sketch eigenvectors (rows), or ``None``.
    """

    damping: float
    precond_eigvals: Tensor | None = None
    precond_eigvecs: Tensor | None = None


class CG(StreamingCurvature):
    """``solve(V)`` runs batched (preconditioned) conjugate gradient on ``M + λI``.

    Exact up to ``tol``: each row stops when ``|v − (M + λI)x| <= tol·|v|``. Each
    iteration costs one pass over the training data for all still-running rows.

    Args:
        tol: relative residual at which a row stops (``>= 0``; ``>= ~1e-6`` in float32).
            The default 1e-2 is what influence scores need: on the digits bench
            (bench/run.py) the LOO correlation of the convex model equals the exact
            solve's to 1e-4 at 1e-2, and the MLP's LDS is as high at 1e-1 as at 1e-3
            (an early-stopped solve acts as a little extra damping). Use 1e-6 or
            below for an exact inverse.
        max_iter: iteration cap per solve (``None``: ``10·P``). An unconverged solve
            warns, naming ``max_iter``/``tol``/``damping`` (unless ``warn=False``).
        preconditioner: ``"auto"`` (default), ``"nystrom"``, ``"ekfac"``, ``"kfac"``,
            ``"diagonal"`` or ``"none"`` (see :class:`~headwater.curvature._streaming.Preconditioner`).
            ``"auto"``: a Nyström sketch of rank ``NYSTROM_RANK`` (100, at most P, within
            ``NYSTROM_MB``; :mod:`headwater.curvature._streaming`) for the GGN/EF, EK-FAC for
            the Hessian (or when the sketch does not fit). ``preconditioner_rank > 0`` alone
            means ``"nystrom"``.
        preconditioner_rank: rank of the Nyström preconditioner (GGN/EF only); ``None``:
            the default rank above; ``0`` with no ``preconditioner``: EK-FAC.
        check_preconditioner: on the first solve, run 5 iterations on up to 4 right-hand
            sides with and without the preconditioner and drop it when the plain residuals
            are smaller: this catches one that is worse from the start, not one that is
            ahead early and behind later. EK-FAC is the latter on the digits CNN (mean
            log10 residual -0.69 vs -0.36 plain after 5 iterations, behind from the 12th;
            32 iterations in all against 21, and 47 against 24 with BatchNorm), which is why
            the default is the Nyström sketch (-2.23 after 5; 5 iterations in all). The
            outcome is in ``fit_notes["cg_preconditioner"]``.
        warn: warn when a solve stops at ``max_iter`` before ``tol`` (a deliberate
            iteration budget may set ``False``; ``last_info`` has the residuals).
        oversample: extra sketch columns of the preconditioner.
        seed: seed of the sketch, the trace probes and the indefiniteness check.
        trace_probes: Hutchinson probes for the default damping.
        (others as :class:`~headwater.curvature.base.Curvature`)

    Attributes:
        last_info: :class:`~headwater.curvature.solvers.CGInfo` of the last solve
            (iterations, residual per row, convergence), or ``None``.

    Memory: ``O(K·P)`` per solve of ``K`` vectors plus ``r·P`` for the preconditioner.
    """

    name = "cg"
    damping_in_state_only = True

    @classmethod
    def memory(cls, size: ProblemSize) -> Memory:
        """stored: the default Nyström preconditioner's eigenvectors (<= NYSTROM_MB); working: 5
        vectors x min(n_query, query_chunk) x P, plus cached linearisations (<= 512 MiB)"""
        return Memory(
            cls._sketch_bytes(size),
            5 * size.rhs * size.num_params * size.itemsize + size.linearisations,
            "2 passes over the data per iteration",
        )

    def __init__(
        self,
        *,
        kind: MatrixKind | str = MatrixKind.GGN,
        damping: float | None = None,
        chunk_size: int = CHUNK_SIZE,
        tol: float = 1e-2,
        max_iter: int | None = 500,
        preconditioner: Preconditioner | str | None = None,
        preconditioner_rank: int | None = None,
        oversample: int = 10,
        seed: int = 0,
        trace_probes: int = 16,
        warn: bool = True,
        check_preconditioner: bool = True,
    ):
        super().__init__(
            kind=kind,
            damping=damping,
            chunk_size=chunk_size,
            preconditioner=preconditioner,
            preconditioner_rank=preconditioner_rank,
            oversample=oversample,
            tol=tol,
            warn=warn,
            seed=seed,
            trace_probes=trace_probes,
        )
        if max_iter is not None and (
            isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 1
        ):
            raise ValueError(f"max_iter: must be a positive integer or None, got {max_iter!r}")
        if not isinstance(check_preconditioner, bool):
            raise TypeError(
                f"check_preconditioner: expected a bool, got {type(check_preconditioner).__name__}"
            )
        self.check_preconditioner, self.max_iter = check_preconditioner, max_iter
        self.last_info: CGInfo | None = None

    @classmethod
    def _state_type(cls) -> type:
        return CGState

    def _fit(
        self, model: nn.Module, task: Task, data: DataLike, progress: ProgressFn | None
    ) -> CGState:
        op, damping = self._attach_damped(model, task, data)
        p = self.layout.num_params
        if self.kind is MatrixKind.HESSIAN:
            smallest, _ = extreme_eigenvalues(
                op.matvec,
                p,
                n_iter=_CHECK_STEPS,
                seed=self.seed + 2,
                dtype=op.dtype,
                device=op.device,
            )
            warn_if_indefinite(self.name, self.kind, smallest, damping, what="smallest Ritz value")
        self._attach_preconditioner(model, task, data, float(damping))
        return CGState(float(damping), *self._sketch(op))

    def _checked(self, precond, v: Tensor):
        """``precond``, or ``None`` when plain CG's residuals after a few iterations on the
        first rows are smaller (decided on the first solve, kept for later ones)."""
        if precond is None or not self.check_preconditioner:
            return precond
        if self._use_preconditioner is None:
            rows = v[:_GUARD_ROWS]
            common = {"damping": self.state.damping, "tol": self.tol, "max_iter": _GUARD_ITERATIONS}
            matvec = self._bound().matvec
            _, with_it = conjugate_gradient(matvec, rows, preconditioner=precond, **common)
            _, plain = conjugate_gradient(matvec, rows, **common)
            score = [float(i.residuals.clamp_min(1e-30).log().mean()) for i in (with_it, plain)]
            self._use_preconditioner = score[0] <= score[1]
            self.fit_notes["cg_preconditioner"] = (
                f"{self._fitted_preconditioner().value if self._use_preconditioner else 'none'}: "
                f"mean log10 residual after {_GUARD_ITERATIONS} iterations on {rows.shape[0]} "
                f"right-hand sides {score[0] / math.log(10):.2f} with "
                f"{self._fitted_preconditioner().value}, {score[1] / math.log(10):.2f} without"
            )
        return precond if self._use_preconditioner else None

    def _solve(self, v: Tensor) -> Tensor:
        s = self.state
        precond = self._checked(self._preconditioner_of(s), v)
        x, self.last_info = conjugate_gradient(
            self._bound().matvec,
            v,
            damping=s.damping,
            tol=self.tol,
            max_iter=self.max_iter,
            preconditioner=precond,
            callback=self._report,
        )
        if self.warn and not self.last_info.converged:
            warnings.warn(
                f"curvature='cg': {int((~self.last_info.converged_rows).sum())} of {v.shape[0]} solves did "
                f"not reach tol={self.tol:g} in {self.last_info.iterations} iterations (worst relative "
                f"residual {float(self.last_info.residuals.max()):.3g}); increase `max_iter`, loosen `tol`, "
                f"increase `damping` (now {s.damping:.3g}) or set `preconditioner_rank`",
                RuntimeWarning,
                stacklevel=3,
            )
        return x

    def _report(self, iteration: int, residuals: Tensor) -> None:
        cap = self.max_iter if self.max_iter is not None else 10 * self.layout.num_params
        self._report_steps("CG iterations", iteration, float(residuals.max()), cap)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "max_iter": self.max_iter,
        }
