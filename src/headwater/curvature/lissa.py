"""LiSSA: ``(M + λI)⁻¹ V`` by a truncated, optionally stochastic Neumann series.

Agarwal, Bullins & Hazan 2017; Koh & Liang 2017. From ``x_0 = v``,

    x_{t+1} = v + (I − (M_t + λI)/s) x_t,     result = mean over repeats of x_depth / s,

with ``M_t`` the curvature of mini-batch ``t`` (or of all the data) and ``s`` the
scale, which must exceed the top eigenvalue of ``M_t + λI``. The error after
``depth`` steps shrinks like ``(1 − (λ_min + λ)/s)^depth``: a short series acts
as extra damping of about ``s/depth``.

With a preconditioner ``P⁻¹ ≈ (M + λI)⁻¹`` (by default, as CG's, a rank-100 Nyström
sketch of ``M``; EK-FAC, K-FAC or diagonal on request; fitted once) the same series runs
on ``P⁻¹(M_t + λI)`` from ``P⁻¹v`` (a preconditioned Richardson iteration): its spectrum
is clustered, so a few steps do the work of hundreds, and ``s`` is then above the top
eigenvalue of ``P⁻¹(M + λI)`` (power iteration). The series needs about ``κ·ln(1/tol)``
steps for a condition number ``κ`` of that operator, CG about ``√κ`` times as few.

**LiSSA needs the operator in the current process** (as :class:`~headwater.curvature.cg.CG`):
after ``load`` call :meth:`LiSSA.bind` with the same model, task and data.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from headwater.curvature._matfree import (
    CHUNK_SIZE,
    BoundOperator,
    extreme_eigenvalues,
    rademacher,
    warn_if_indefinite,
)
from headwater.curvature._streaming import Preconditioner, StreamingCurvature
from headwater.curvature.base import Memory, ProblemSize
from headwater.curvature.operators import MatrixKind
from headwater.curvature.solvers import LissaInfo, lissa
from headwater.data import DataLike, num_examples, subset
from headwater.errors import NumericalError
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = ["LiSSA", "LissaState"]

SCALE_MARGIN = 1.1
"""Default ``scale = SCALE_MARGIN × (λ_max(M) + λ)``, ``λ_max`` from a short Lanczos run."""
_LANCZOS_STEPS = 20
_POWER_STEPS = 20  # power iterations for the top eigenvalue of the preconditioned operator


@dataclass(frozen=True)
class LissaState:
    """Fitted LiSSA.

    Attributes:
        damping: λ.
        top_eigenvalue: estimate of ``λ_max(M)`` on all the data (undamped), or, with a
            preconditioner, of ``λ_max(P⁻¹(M + λI))``; NaN when ``scale`` was given and
            no estimate was needed.
        precond_eigvals: ``[r]`` eigenvalues of the Nyström preconditioner's sketch, or
            ``None`` without one.
        precond_eigvecs: ``[r, P]`` its eigenvectors (rows), or ``None``.
    """

    damping: float
    top_eigenvalue: float
    precond_eigvals: Tensor | None = None
    precond_eigvecs: Tensor | None = None


class LiSSA(StreamingCurvature):
    """``solve(V)`` runs the LiSSA recursion on ``M + λI``.

    Args:
        depth: recursion steps per repeat (``>= 1``); with full-data products a cap:
            each row stops at ``tol``.
        repeats: independent recursions averaged (``>= 1``) with mini-batches; with
            full-data products every repeat is the same recursion, so one is run.
        scale: ``s`` above the top eigenvalue of every ``M_t + λI``; default
            ``1.1 × (λ_max + λ)`` with ``λ_max`` of the full-data ``M`` from 20 Lanczos steps.
        batch_size: examples per step's curvature; ``None`` (default) uses all the
            data every step (deterministic). Mini-batch ``t`` of repeat ``r`` is
            slice ``(r·depth + t) mod n_batches`` of a seeded permutation, redrawn
            every pass over the data.
        seed: seed of the mini-batch order, the trace probes and the Lanczos start.
        preconditioner: ``"auto"`` (default: a Nyström sketch of the GGN/EF as for CG,
            EK-FAC for the Hessian or when the sketch does not fit), ``"nystrom"``,
            ``"ekfac"``, ``"kfac"``, ``"diagonal"`` or ``"none"``; see
            :class:`~headwater.curvature._streaming.Preconditioner`. The sketch is part of
            the saved state; the others are refitted by :meth:`bind`.
        preconditioner_rank: rank of the Nyström sketch (``None``: 100, at most P).
        oversample: extra sketch columns.
        tol: with full-data products (``batch_size=None``) each row stops at the first
            step whose relative residual is ``<= tol`` (as CG's ``tol``, but with a
            preconditioner the residual ``|P⁻¹(v − (M + λI)x)| / |P⁻¹v|`` of the
            preconditioned system), and a solve that reaches ``depth`` first warns;
            ``0``: every step runs (a fixed budget, no warning). Mini-batch recursions run
            all ``depth`` steps (a step's residual is then one mini-batch's).
        warn: warn when a full-data solve reaches ``depth`` before ``tol`` (``False`` for
            a deliberate step budget; ``last_info`` has the residual).
        trace_probes: Hutchinson probes for the default damping.
        (others as :class:`~headwater.curvature.base.Curvature`)

    Attributes:
        last_info: :class:`~headwater.curvature.solvers.LissaInfo` of the last solve.

    Raises:
        RuntimeError: (at solve) when the recursion diverges, naming ``scale``, or
            ``damping`` when ``M + λI`` has a negative eigenvalue.
    """

    name = "lissa"

    @classmethod
    def memory(cls, size: ProblemSize) -> Memory:
        """stored: the default Nyström preconditioner's eigenvectors (<= NYSTROM_MB); working: 3
        vectors x min(n_query, query_chunk) x P, plus cached linearisations"""
        return Memory(
            cls._sketch_bytes(size),
            3 * size.rhs * size.num_params * size.itemsize + size.linearisations,
            "up to depth passes over the data (mini-batch passes with batch_size)",
        )

    def __init__(
        self,
        *,
        kind: MatrixKind | str = MatrixKind.GGN,
        damping: float | None = None,
        chunk_size: int = CHUNK_SIZE,
        depth: int = 200,
        repeats: int = 1,
        scale: float | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        tol: float = 1e-2,
        trace_probes: int = 16,
        preconditioner: Preconditioner | str | None = None,
        preconditioner_rank: int | None = None,
        oversample: int = 10,
        warn: bool = True,
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
        for arg, value, low in (
            ("depth", depth, 1),
            ("repeats", repeats, 1),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{arg}: must be an integer >= {low}, got {value!r}")
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size: must be a positive integer or None, got {batch_size!r}")
        if scale is not None and (
            isinstance(scale, bool)
            or not isinstance(scale, int | float)
            or not math.isfinite(scale)
            or scale <= 0
        ):
            raise ValueError(f"scale: must be a finite float > 0 or None, got {scale!r}")
        self.depth, self.repeats, self.batch_size = depth, repeats, batch_size
        self.scale = None if scale is None else float(scale)
        self.last_info: LissaInfo | None = None

    @classmethod
    def _state_type(cls) -> type:
        return LissaState

    def _fit(
        self, model: nn.Module, task: Task, data: DataLike, progress: ProgressFn | None
    ) -> LissaState:
        op, damping = self._attach_damped(model, task, data)
        p = self.layout.num_params
        top = math.nan
        self._attach_preconditioner(model, task, data, float(damping))
        eigvals, eigvecs = self._sketch(op)
        state = LissaState(float(damping), top, eigvals, eigvecs)
        precondition = self._preconditioner_of(state)
        if precondition is not None and self.scale is None:
            top = self._preconditioned_top(op, precondition, float(damping))
        if (self.scale is None and precondition is None) or self.kind is MatrixKind.HESSIAN:
            smallest, largest = extreme_eigenvalues(
                op.matvec,
                p,
                n_iter=_LANCZOS_STEPS,
                seed=self.seed + 2,
                dtype=op.dtype,
                device=op.device,
            )
            if self.kind is MatrixKind.HESSIAN:
                warn_if_indefinite(
                    self.name, self.kind, smallest, damping, what="smallest Ritz value"
                )
            if precondition is None:
                top = largest
        return dataclasses.replace(state, top_eigenvalue=float(top))

    def _preconditioned_top(self, op: BoundOperator, precondition, damping: float) -> float:
        """``λ_max(P⁻¹(M + λI))`` by power iteration (the operator is similar to the
        symmetric ``P^{-1/2}(M + λI)P^{-1/2}``, so its eigenvalues are real)."""
        v = rademacher(1, self.layout.num_params, self.seed + 3, op.dtype, op.device)
        estimate = 0.0
        for _ in range(_POWER_STEPS):
            w = precondition(op.matvec(v) + damping * v)
            estimate = float(w.norm() / v.norm())
            v = w / w.norm()
        return estimate

    @property
    def fitted_scale(self) -> float:
        """The scale ``s`` used by ``solve``."""
        self._check_fitted()
        if self.scale is not None:
            return self.scale
        if self._fitted_preconditioner() is not Preconditioner.NONE:  # the estimate includes λ
            return SCALE_MARGIN * self.state.top_eigenvalue
        return SCALE_MARGIN * (max(self.state.top_eigenvalue, 0.0) + self.state.damping)

    def _step_matvec(self, op: BoundOperator):
        if self.batch_size is None:
            return lambda v, step: op.matvec(v)
        n = num_examples(op.data, "train")
        size = min(self.batch_size, n)
        n_batches = n // size
        cache: dict[int, Tensor] = {}

        def matvec(v: Tensor, step: int) -> Tensor:
            epoch, slot = divmod(step, n_batches)
            if epoch not in cache:
                cache.clear()
                cache[epoch] = torch.randperm(
                    n, generator=torch.Generator().manual_seed(self.seed * 7919 + epoch)
                )
            return op.on(subset(op.data, cache[epoch][slot * size : (slot + 1) * size]))(v)

        return matvec

    def _solve(self, v: Tensor) -> Tensor:
        op = self._bound()
        step_matvec, damping, precondition = (
            self._step_matvec(op),
            self.state.damping,
            self._preconditioner_of(self.state),
        )
        if self._fitted_preconditioner() is not Preconditioner.NONE:
            if precondition is None:
                raise RuntimeError("LiSSA's preconditioner is not in this process: call .bind(...)")
            plain = step_matvec

            def step_matvec(w: Tensor, step: int, damping: float = damping) -> Tensor:
                return precondition(plain(w, step) + damping * w)  # P⁻¹(M_t + λI) w

            v, damping = precondition(v), 0.0  # the series runs on P⁻¹(M + λI), from P⁻¹v
        stochastic = self.batch_size is not None
        try:
            x, self.last_info = lissa(
                step_matvec,
                v,
                depth=self.depth,
                scale=self.fitted_scale,
                repeats=self.repeats if stochastic else 1,
                damping=damping,
                tol=0.0 if stochastic else self.tol,
                callback=self._report,
            )
        except RuntimeError as err:
            if not stochastic or "diverged" not in str(err):
                raise
            raise NumericalError(
                f"{err} (with batch_size={self.batch_size} a mini-batch's top eigenvalue can "
                "exceed the full-data one: increase `scale` or `batch_size`)"
            ) from err
        if self.warn and not stochastic and self.tol > 0 and not self.last_info.converged:
            warnings.warn(
                f"curvature='lissa': the series did not reach tol={self.tol:g} in depth="
                f"{self.depth} steps (worst relative residual {self.last_info.residual:.3g}"
                f"{' of the preconditioned system' if precondition is not None else ''}); "
                f"increase `depth` or `damping` (now {self.state.damping:.3g}), loosen `tol`, or "
                "use curvature='cg', which needs far fewer steps",
                RuntimeWarning,
                stacklevel=3,
            )
        return x

    def _report(self, step: int, residuals: Tensor) -> None:
        if self.batch_size is not None:
            report(self.progress, "LiSSA steps", step, self.repeats * self.depth)
        else:
            self._report_steps("LiSSA steps", step, float(residuals.max()), self.depth)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "depth": self.depth,
            "repeats": self.repeats,
            "scale": self.scale,
            "batch_size": self.batch_size,
        }
