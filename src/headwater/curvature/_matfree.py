"""Shared pieces of the matrix-free curvatures (CG, LiSSA, Arnoldi, Lanczos, Nyström, Diagonal).

- the one damping policy: ``damping = DEFAULT_RELATIVE_DAMPING × trace(M)/P``, the
  trace from a seeded Hutchinson estimate where ``M`` is only available as products;
- the warning for an indefinite, (nearly) undamped system;
- extreme eigenvalues by a short Lanczos run (LiSSA's scale, indefiniteness checks);
- subsets of a data set (mini-batches, held-out samples).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from enum import Enum
from typing import TypeVar

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset

from headwater.curvature.base import DEFAULT_RELATIVE_DAMPING, Curvature
from headwater.curvature.operators import MatrixKind, curvature_matvec
from headwater.curvature.solvers import MatVec, lanczos
from headwater.data import DataLike
from headwater.gradients.flat import ParamLayout
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = [
    "CHUNK_SIZE",
    "BoundOperator",
    "Preconditioner",
    "check_layout",
    "default_damping",
    "extreme_eigenvalues",
    "fit_preconditioner",
    "hutchinson_trace",
    "rademacher",
    "subset",
    "warn_if_indefinite",
]


CHUNK_SIZE = 512
"""Default examples per chunk of the matrix-free curvatures: each chunk's linearisation is
cached (see :func:`~headwater.curvature.operators.curvature_matvec`), and larger chunks
mean fewer, larger products (measured on the digits MLP: 1.6 ms per GGN-vector product
with chunks of 1000, 5.5 ms with chunks of 64)."""


def rademacher(n: int, dim: int, seed: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``n`` seeded Rademacher (±1) vectors ``[n, dim]``, the same on every device."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    signs = torch.randint(0, 2, (n, dim), generator=generator, dtype=torch.int8)
    return (2 * signs - 1).to(device=device, dtype=dtype)


def hutchinson_trace(
    matvec: MatVec,
    dim: int,
    *,
    probes: int,
    seed: int,
    dtype: torch.dtype,
    device: torch.device,
    batch: int = 8,
    progress: ProgressFn | None = None,
) -> float:
    """Hutchinson's estimate ``trace(M) ≈ (1/s) Σ_j z_jᵀ M z_j`` with Rademacher ``z_j``.

    Hutchinson 1989, "A stochastic estimator of the trace of the influence matrix".
    The probes go through ``matvec`` ``batch`` at a time (``[batch, P]``).
    """
    total = 0.0
    for start in range(0, probes, batch):
        z = rademacher(min(batch, probes - start), dim, seed + start, dtype, device)  # [b, P]
        total += float((z * matvec(z)).sum())
        report(progress, "damping probes", min(start + batch, probes), probes)
    return total / probes


def default_damping(mean_eigenvalue: float) -> float:
    """The library's one default: ``DEFAULT_RELATIVE_DAMPING × max(trace(M)/P, 0)``."""
    return DEFAULT_RELATIVE_DAMPING * max(float(mean_eigenvalue), 0.0)


def warn_if_indefinite(
    name: str,
    kind: MatrixKind,
    smallest: float,
    damping: float,
    *,
    what: str = "smallest eigenvalue",
    hint: str = "",
) -> None:
    """Warn when ``smallest + damping <= 0``: the damped system is not positive definite."""
    if smallest + damping > 0:
        return
    hint = hint or (
        "Use kind='ggn' or increase `damping`."
        if kind is MatrixKind.HESSIAN
        else "Increase `damping`."
    )
    warnings.warn(
        f"curvature={name!r} ({kind.value}): the damped matrix is not positive definite "
        f"({what} {smallest:.3g} + damping {damping:.3g} <= 0); scores are unreliable. {hint}",
        RuntimeWarning,
        stacklevel=4,
    )


def extreme_eigenvalues(
    matvec: MatVec, dim: int, *, n_iter: int, seed: int, dtype: torch.dtype, device: torch.device
) -> tuple[float, float]:
    """``(smallest, largest)`` Ritz values of ``M`` after ``n_iter`` Lanczos steps.

    Ritz values lie inside the spectrum and converge fastest at its ends, so the
    largest is a (tight after ~20 steps) lower bound of ``λ_max``, the smallest an
    upper bound of ``λ_min``.
    """
    eigvals, _, _ = lanczos(
        matvec, dim, n_iter=min(n_iter, dim), seed=seed, dtype=dtype, device=device
    )
    return float(eigvals.min()), float(eigvals.max())


def subset(data: DataLike, indices: Tensor | Sequence[int]) -> DataLike:
    """The examples ``indices`` of ``data`` (same form: tensor pair or Dataset), in that order."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(data, tuple | list):
        inputs, targets = data
        return inputs[idx.to(inputs.device)], targets[idx.to(targets.device)]
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, Dataset):
        return Subset(data, idx.tolist())
    raise TypeError(
        f"data: expected an (inputs, targets) pair, a Dataset or a DataLoader, got {type(data).__name__}"
    )


class BoundOperator:
    """``M`` (undamped, with weight decay) of ``model`` on ``data``, re-created on demand.

    Matrix-free curvatures keep one of these instead of a stored matrix: each
    product streams over ``data`` (see :func:`~headwater.curvature.operators.curvature_matvec`),
    reusing each chunk's linearisation when all of them fit in ``CACHE_MB`` (512 MiB),
    else rebuilding it, so memory is ``O(K·P + chunk·activations)`` whatever ``n_train``
    is. It holds references to the model, task and data, so it lives only in the
    current process.
    """

    def __init__(
        self, model: nn.Module, task: Task, data: DataLike, kind: MatrixKind, chunk_size: int
    ):
        self.model, self.task, self.data, self.kind, self.chunk_size = (
            model,
            task,
            data,
            kind,
            chunk_size,
        )
        self.matvec: MatVec = curvature_matvec(model, task, data, kind, chunk_size=chunk_size)
        self.layout = ParamLayout.of(task.parameters(model))
        ref = next(iter(task.parameters(model).values()))
        self.dtype, self.device = ref.dtype, ref.device

    def default_damping(self, *, probes: int, seed: int, progress: ProgressFn | None = None) -> float:
        """The library's default damping, from a Hutchinson estimate of ``trace(M)/P``."""
        p = self.layout.num_params
        trace = hutchinson_trace(self.matvec, p, probes=probes, seed=seed, dtype=self.dtype, device=self.device,
                                 progress=progress)
        return default_damping(trace / p)

    def on(self, data: DataLike) -> MatVec:
        """The same operator on other data (e.g. a mini-batch)."""
        return curvature_matvec(self.model, self.task, data, self.kind, chunk_size=self.chunk_size)


def check_layout(expected: ParamLayout | None, got: ParamLayout, name: str) -> None:
    """Raise ``ValueError`` naming ``model``/``task`` when parameter layouts differ."""
    if expected is not None and expected != got:
        raise ValueError(
            f"model/task: {name} was fitted on parameters {list(expected.names)} with shapes "
            f"{[list(s) for s in expected.shapes]}, but these select {list(got.names)} with shapes "
            f"{[list(s) for s in got.shapes]}"
        )


class Preconditioner(str, Enum):
    """A preconditioner ``P⁻¹ ≈ (M + λI)⁻¹`` for CG and LiSSA, fitted once.

    ``"ekfac"``/``"kfac"``: the Kronecker-factored curvature of the same kind (the GGN
    for ``kind="hessian"``) with the same damping; ``"diagonal"``: the exact diagonal
    (GGN/EF) or its Hutchinson estimate (Hessian); ``"nystrom"``: a randomized Nyström
    sketch of ``M`` (fitted by CG itself, rank ``preconditioner_rank``).
    """

    NONE = "none"
    NYSTROM = "nystrom"
    EKFAC = "ekfac"
    KFAC = "kfac"
    DIAGONAL = "diagonal"


def fit_preconditioner(
    which: Preconditioner,
    model: nn.Module,
    task: Task,
    data: DataLike,
    kind: MatrixKind,
    damping: float,
    chunk_size: int,
) -> MatVec:
    """Fit a Kronecker-factored or diagonal curvature with ``damping`` and return its ``solve``."""
    from headwater.curvature.diagonal import Diagonal
    from headwater.curvature.kfac import EKFAC, KFAC

    if which is Preconditioner.DIAGONAL:
        method = "hutchinson" if kind is MatrixKind.HESSIAN else "exact"
        curvature = Diagonal(kind=kind, damping=damping, chunk_size=chunk_size, method=method)
    elif which in (Preconditioner.EKFAC, Preconditioner.KFAC):
        cls = EKFAC if which is Preconditioner.EKFAC else KFAC
        factor_kind = MatrixKind.GGN if kind is MatrixKind.HESSIAN else kind
        curvature = cls(kind=factor_kind, damping=damping, chunk_size=chunk_size)
    else:
        raise ValueError(f"preconditioner: {which.value!r} is not fitted here")
    return curvature.fit(model, task, data).solve


_Self = TypeVar("_Self", bound="StreamingCurvature")


class StreamingCurvature(Curvature):
    """A curvature whose ``solve`` runs passes over the training data (CG, LiSSA).

    It holds the data's operator and an optional fitted preconditioner in this process;
    neither is part of the saved state, so after ``load`` call :meth:`bind`.
    """

    solve_streams_data = True

    def __init__(self, *, kind: MatrixKind | str, damping: float | None, chunk_size: int,
                 preconditioner: Preconditioner | str):
        super().__init__(kind=kind, damping=damping, chunk_size=chunk_size)
        try:
            self.preconditioner = Preconditioner(preconditioner)
        except ValueError as err:
            raise ValueError(
                f"preconditioner: expected one of {[p.value for p in Preconditioner]}, "
                f"got {preconditioner!r}"
            ) from err
        self._operator: BoundOperator | None = None
        self._precondition: MatVec | None = None
        self.progress: ProgressFn | None = None  # told about each solve's iterations

    def fit(self: _Self, model: nn.Module, task: Task, data: DataLike, *,
            progress: ProgressFn | None = None) -> _Self:
        """As :meth:`Curvature.fit`; ``progress`` also hears every later solve's iterations."""
        self.progress = progress
        return super().fit(model, task, data, progress=progress)

    def _attach(self, model: nn.Module, task: Task, data: DataLike) -> BoundOperator:
        """Bind the data's operator (and drop a preconditioner of other data)."""
        self._operator = BoundOperator(model, task, data, self.kind, self.chunk_size)
        self._precondition = None
        return self._operator

    def _attach_preconditioner(self, model: nn.Module, task: Task, data: DataLike, damping: float) -> None:
        """Fit an EK-FAC, K-FAC or diagonal preconditioner with ``damping`` (a Nyström one is
        part of the fitted state instead)."""
        if self.preconditioner not in (Preconditioner.NONE, Preconditioner.NYSTROM):
            self._precondition = fit_preconditioner(
                self.preconditioner, model, task, data, self.kind, float(damping), self.chunk_size
            )

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
