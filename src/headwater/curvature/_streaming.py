"""Curvatures whose ``solve`` streams over the training data (CG, LiSSA) and their
preconditioners: a Nyström sketch of the curvature (the default, saved in the state) or a
fitted EK-FAC, K-FAC or diagonal curvature (refitted by ``bind``)."""

from __future__ import annotations

import math
from enum import Enum
from typing import Any, TypeVar

from torch import Tensor, nn

from headwater.curvature._matfree import BoundOperator, check_layout
from headwater.curvature.base import Curvature, ProblemSize
from headwater.curvature.diagonal import Diagonal
from headwater.curvature.kfac import EKFAC, KFAC
from headwater.curvature.operators import MatrixKind
from headwater.curvature.solvers import MatVec, nystrom, nystrom_preconditioner
from headwater.data import DataLike
from headwater.gradients.flat import ParamLayout
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = [
    "NYSTROM_MB",
    "NYSTROM_RANK",
    "Preconditioner",
    "StreamingCurvature",
    "fit_preconditioner",
]

NYSTROM_RANK = 100
"""Default rank of CG's and LiSSA's Nyström preconditioner (GGN/EF), capped by :data:`NYSTROM_MB`.
Measured at the default damping on the digits (50 queries, one thread, tol 1e-2):
CG iterations with rank 100 / EK-FAC / none: CNN 5 / 32 / 21, CNN with BatchNorm 5 / 47 / 24,
MLP 8 / 18 / 16; on the CNN ranks 25, 50, 100, 200 took 9, 7, 5, 4 iterations and
2.2, 1.3, 1.1, 1.6 s in all. LiSSA on the CNN: 13 steps with rank 100 (the preconditioned
operator's condition number about 3.6), more than 200 with EK-FAC (relative residual 0.025
after 200)."""

NYSTROM_MB = 256.0
"""Budget (MiB) of the default Nyström preconditioner's ``[rank, P]`` eigenvectors; when
fewer than 10 of them fit, the default preconditioner is EK-FAC."""


def default_sketch_rank(num_params: int) -> int:
    """The default Nyström preconditioner's rank for ``num_params`` parameters: :data:`NYSTROM_RANK`
    (at most P) within :data:`NYSTROM_MB`, or 0 when fewer than 10 vectors fit."""
    fits = int(NYSTROM_MB * 2**20 // (num_params * 8))
    return min(NYSTROM_RANK, num_params, fits) if fits >= 10 else 0


class Preconditioner(str, Enum):
    """A preconditioner ``P⁻¹ ≈ (M + λI)⁻¹`` for CG and LiSSA, fitted once.

    ``"ekfac"``/``"kfac"``: the Kronecker-factored curvature of the same kind (the GGN
    for ``kind="hessian"``) with the same damping; ``"diagonal"``: the exact diagonal
    (GGN/EF) or its Hutchinson estimate (Hessian); ``"nystrom"``: a randomized Nyström
    sketch of ``M`` (rank ``preconditioner_rank``, part of the fitted state); ``"auto"``: the
    sketch of rank :data:`NYSTROM_RANK` for the GGN/EF when it fits :data:`NYSTROM_MB`,
    else EK-FAC.
    """

    NONE = "none"
    AUTO = "auto"
    NYSTROM = "nystrom"
    EKFAC = "ekfac"
    KFAC = "kfac"
    DIAGONAL = "diagonal"


_PRECONDITIONERS = {
    Preconditioner.EKFAC: EKFAC,
    Preconditioner.KFAC: KFAC,
    Preconditioner.DIAGONAL: Diagonal,
}
"""Curvature classes CG and LiSSA can be preconditioned with (a Nyström sketch is fitted by
:meth:`StreamingCurvature._sketch` instead)."""


def fit_preconditioner(
    which: Preconditioner,
    model: nn.Module,
    task: Task,
    data: DataLike,
    kind: MatrixKind,
    damping: float,
    chunk_size: int,
) -> MatVec:
    """Fit the curvature named by ``which`` as a preconditioner (its class's
    :meth:`~headwater.curvature.base.Curvature.preconditioner` ability) with ``damping``
    and return its ``solve``."""
    cls = _PRECONDITIONERS.get(which)
    curvature = None if cls is None else cls.preconditioner(kind, damping, chunk_size)
    if curvature is None:
        raise ValueError(f"preconditioner: {which.value!r} is not fitted here")
    return curvature.fit(model, task, data).solve


_Self = TypeVar("_Self", bound="StreamingCurvature")


class StreamingCurvature(Curvature):
    """A curvature whose ``solve`` runs passes over the training data (CG, LiSSA).

    It holds the data's operator and an optional EK-FAC/K-FAC/diagonal preconditioner in
    this process; neither is part of the saved state (a Nyström sketch is), so after
    ``load`` call :meth:`bind`.

    Args:
        preconditioner: see :class:`Preconditioner`; ``None``: ``"auto"``, or
            ``"nystrom"`` when ``preconditioner_rank > 0`` is given, ``"ekfac"`` when it is 0.
        preconditioner_rank: rank of the Nyström preconditioner (GGN/EF only); ``None``:
            :data:`NYSTROM_RANK` (at most P).
        oversample: extra sketch columns of the Nyström preconditioner.
        tol: relative residual at which a solve's row stops (``>= 0``; each subclass says
            how it stops and what ``0`` means).
        warn: warn when a solve reaches its step cap before ``tol``.
        seed: seed of the method's random draws (the trace probes use ``seed + 1``).
        trace_probes: Hutchinson probes for the default damping (``damping=None``).
        (others as :class:`~headwater.curvature.base.Curvature`)
    """

    solve_streams_data = True

    def __init__(
        self,
        *,
        kind: MatrixKind | str,
        damping: float | None,
        chunk_size: int,
        preconditioner: Preconditioner | str | None,
        preconditioner_rank: int | None,
        oversample: int,
        tol: float,
        warn: bool,
        seed: int,
        trace_probes: int,
    ):
        super().__init__(kind=kind, damping=damping, chunk_size=chunk_size)
        for arg, value, low in (
            ("seed", seed, 0),
            ("trace_probes", trace_probes, 1),
            ("preconditioner_rank", 0 if preconditioner_rank is None else preconditioner_rank, 0),
            ("oversample", oversample, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{arg}: must be an integer >= {low}, got {value!r}")
        if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol >= 0:
            raise ValueError(f"tol: must be a float >= 0, got {tol!r}")
        if not isinstance(warn, bool):
            raise TypeError(f"warn: expected a bool, got {type(warn).__name__}")
        self.seed, self.trace_probes = seed, trace_probes
        self.preconditioner_rank, self.oversample = preconditioner_rank, oversample
        self.tol, self.warn = float(tol), warn
        if preconditioner is None:
            preconditioner = {None: Preconditioner.AUTO, 0: Preconditioner.EKFAC}.get(
                preconditioner_rank, Preconditioner.NYSTROM
            )
        try:
            self.preconditioner = Preconditioner(preconditioner)
        except ValueError as err:
            raise ValueError(
                f"preconditioner: expected one of {[p.value for p in Preconditioner]}, "
                f"got {preconditioner!r}"
            ) from err
        sketch = self.preconditioner in (Preconditioner.NYSTROM, Preconditioner.AUTO)
        if preconditioner_rank is not None and sketch != (preconditioner_rank > 0):
            raise ValueError(
                "preconditioner_rank: must be > 0 (or None) exactly when preconditioner is "
                f"'nystrom' or 'auto', got preconditioner_rank={preconditioner_rank} with "
                f"preconditioner={self.preconditioner.value!r}"
            )
        if self.kind is MatrixKind.HESSIAN and (
            preconditioner_rank or self.preconditioner is Preconditioner.NYSTROM
        ):
            raise ValueError(
                "preconditioner_rank: the Nystrom preconditioner needs a positive semi-definite "
                "matrix; use kind='ggn' or 'ef', or preconditioner_rank=0"
            )
        self._operator: BoundOperator | None = None
        self._precondition: MatVec | None = None
        self._use_preconditioner: bool | None = None  # a check of the first solve, if any
        self.progress: ProgressFn | None = None  # told about each solve's iterations

    def _report_steps(self, stage: str, done: int, worst: float, cap: int) -> None:
        """``progress(stage, done, estimated total)``: the total assumes the worst row's
        relative residual keeps shrinking at its average rate so far (geometric
        convergence) until ``tol``, at most ``cap``, so a progress bar shows the remaining
        time from the first iterations on."""
        if self.progress is None:
            return
        tol = self.tol
        if worst <= tol or tol <= 0:
            total = done if worst <= tol else cap
        elif 0 < worst < 1:
            total = min(cap, max(done, math.ceil(done * math.log(tol) / math.log(worst))))
        else:
            total = cap
        report(self.progress, stage, done, total)

    def _attach(self, model: nn.Module, task: Task, data: DataLike) -> BoundOperator:
        """Bind the data's operator (and drop a preconditioner of other data)."""
        self._operator = BoundOperator(model, task, data, self.kind, self.chunk_size)
        self._precondition, self._use_preconditioner = None, None
        self.fit_notes["curvature_product"] = self._operator.product
        return self._operator

    def fit(
        self: _Self,
        model: nn.Module,
        task: Task,
        data: DataLike,
        *,
        progress: ProgressFn | None = None,
    ) -> _Self:
        """As :meth:`Curvature.fit`; ``progress`` also hears every later solve's iterations."""
        self.progress = progress
        return super().fit(model, task, data, progress=progress)

    def _attach_damped(
        self, model: nn.Module, task: Task, data: DataLike
    ) -> tuple[BoundOperator, float]:
        """:meth:`_attach`, and the damping: the set one or the default from a Hutchinson
        trace (``trace_probes`` probes, ``seed + 1``)."""
        op = self._attach(model, task, data)
        damping = self.damping
        if damping is None:
            damping = op.default_damping(
                probes=self.trace_probes, seed=self.seed + 1, progress=self.progress
            )
        return op, damping

    def _attach_preconditioner(
        self, model: nn.Module, task: Task, data: DataLike, damping: float
    ) -> None:
        """Fit an EK-FAC, K-FAC or diagonal preconditioner with ``damping`` (a Nyström one is
        part of the fitted state instead)."""
        which = self._fitted_preconditioner()
        if which not in (Preconditioner.NONE, Preconditioner.NYSTROM):
            self._precondition = fit_preconditioner(
                which, model, task, data, self.kind, float(damping), self.chunk_size
            )

    @staticmethod
    def _sketch_bytes(size: ProblemSize) -> int:
        """Bytes of the default Nyström preconditioner's eigenvectors for ``size``."""
        return default_sketch_rank(size.num_params) * size.num_params * size.itemsize

    def _sketch_rank(self) -> int:
        """The Nyström rank to fit: the given one, or under ``"auto"`` the default rule
        (0 for the Hessian, or when fewer than 10 vectors fit :data:`NYSTROM_MB`)."""
        if self.preconditioner is Preconditioner.NYSTROM:
            return self.preconditioner_rank or min(NYSTROM_RANK, self.layout.num_params)
        if self.preconditioner is not Preconditioner.AUTO or self.kind is MatrixKind.HESSIAN:
            return 0
        return default_sketch_rank(self.layout.num_params)

    def _fitted_preconditioner(self) -> Preconditioner:
        """The preconditioner ``"auto"`` stands for (needs the fitted layout); else the set one."""
        if self.preconditioner is not Preconditioner.AUTO:
            return self.preconditioner
        return Preconditioner.NYSTROM if self._sketch_rank() else Preconditioner.EKFAC

    def _sketch(self, op: BoundOperator) -> tuple[Tensor | None, Tensor | None]:
        """``(eigenvalues [r], eigenvectors [r, P])`` of the Nyström preconditioner's sketch of
        the undamped ``M``, or ``(None, None)`` without one (part of the fitted state)."""
        rank, p = self._sketch_rank(), self.layout.num_params
        if rank == 0:
            return None, None
        if rank > p:
            raise ValueError(f"preconditioner_rank: must be <= P = {p}, got {rank}")
        return nystrom(
            op.matvec,
            p,
            rank=rank,
            seed=self.seed,
            oversample=self.oversample,
            dtype=op.dtype,
            device=op.device,
        )

    def _preconditioner_of(self, state: Any) -> MatVec | None:
        """``P⁻¹`` of a fitted state: its Nyström sketch (``precond_eigvals``/``precond_eigvecs``
        and ``damping``) or else the attached EK-FAC/K-FAC/diagonal one (``None``: none)."""
        if state.precond_eigvals is not None and state.precond_eigvals.numel() > 0:
            return nystrom_preconditioner(
                state.precond_eigvals, state.precond_eigvecs, state.damping
            )
        return self._precondition

    def _matvec(self, v: Tensor) -> Tensor:
        return self._bound().matvec(v) + self.state.damping * v

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "preconditioner": self.preconditioner.value,
            "preconditioner_rank": self.preconditioner_rank,
            "oversample": self.oversample,
            "tol": self.tol,
            "seed": self.seed,
            "trace_probes": self.trace_probes,
        }

    def bind(self: _Self, model: nn.Module, task: Task, data: DataLike) -> _Self:
        """Attach the operator of ``model``/``task``/``data`` to a loaded (or fitted) state
        without refitting it (an EK-FAC, K-FAC or diagonal preconditioner is refitted: it is
        not part of the saved state). The parameters must have the fitted layout."""
        self._check_fitted()
        check_layout(self.layout, ParamLayout.of(task.parameters(model)), type(self).__name__)
        self._attach(model, task, data)
        self._attach_preconditioner(model, task, data, self.state.damping)
        return self

    def _bound(self) -> BoundOperator:
        if self._operator is None:
            raise RuntimeError(
                f"{type(self).__name__} has no operator in this process: call .fit(model, task, data), "
                "or .bind(model, task, data) after .load(...)"
            )
        return self._operator
