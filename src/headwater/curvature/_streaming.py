"""Curvatures whose ``solve`` streams over the training data (CG, LiSSA) and their
fitted preconditioners (EK-FAC, K-FAC, diagonal; a Nyström one is fitted by CG itself)."""

from __future__ import annotations

import math
from enum import Enum
from typing import TypeVar

from torch import nn

from headwater.curvature._matfree import BoundOperator, check_layout
from headwater.curvature.base import Curvature
from headwater.curvature.diagonal import Diagonal
from headwater.curvature.kfac import EKFAC, KFAC
from headwater.curvature.operators import MatrixKind
from headwater.curvature.solvers import MatVec
from headwater.data import DataLike
from headwater.gradients.flat import ParamLayout
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = ["Preconditioner", "StreamingCurvature", "fit_preconditioner"]


class Preconditioner(str, Enum):
    """A preconditioner ``P⁻¹ ≈ (M + λI)⁻¹`` for CG and LiSSA, fitted once.

    ``"ekfac"``/``"kfac"``: the Kronecker-factored curvature of the same kind (the GGN
    for ``kind="hessian"``) with the same damping; ``"diagonal"``: the exact diagonal
    (GGN/EF) or its Hutchinson estimate (Hessian); ``"nystrom"``: a randomized Nyström
    sketch of ``M`` (fitted by CG itself, rank ``preconditioner_rank``); ``"auto"``: the
    curvature's own default (CG: see :class:`~headwater.curvature.cg.CG`).
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
"""Curvature classes CG and LiSSA can be preconditioned with (a Nyström one is fitted by CG)."""


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

    It holds the data's operator and an optional fitted preconditioner in this process;
    neither is part of the saved state, so after ``load`` call :meth:`bind`.

    Args:
        preconditioner: see :class:`Preconditioner`.
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
        preconditioner: Preconditioner | str,
        seed: int,
        trace_probes: int,
    ):
        super().__init__(kind=kind, damping=damping, chunk_size=chunk_size)
        for arg, value, low in (("seed", seed, 0), ("trace_probes", trace_probes, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{arg}: must be an integer >= {low}, got {value!r}")
        self.seed, self.trace_probes = seed, trace_probes
        try:
            self.preconditioner = Preconditioner(preconditioner)
        except ValueError as err:
            raise ValueError(
                f"preconditioner: expected one of {[p.value for p in Preconditioner]}, "
                f"got {preconditioner!r}"
            ) from err
        self._operator: BoundOperator | None = None
        self._precondition: MatVec | None = None
        self._use_preconditioner: bool | None = None  # a check of the first solve, if any
        self.progress: ProgressFn | None = None  # told about each solve's iterations

    def _report_steps(self, stage: str, done: int, worst: float, tol: float, cap: int) -> None:
        """``progress(stage, done, estimated total)``: the total assumes the worst row's
        relative residual keeps shrinking at its average rate so far (geometric
        convergence) until ``tol``, at most ``cap``, so a progress bar shows the remaining
        time from the first iterations on."""
        if self.progress is None:
            return
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

    def _fitted_preconditioner(self) -> Preconditioner:
        """The preconditioner ``"auto"`` stands for (needs the fitted layout); else the set one."""
        return self.preconditioner

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
