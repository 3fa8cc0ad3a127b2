"""Shared pieces of the matrix-free curvatures (CG, LiSSA, Arnoldi, Lanczos, Nyström, Diagonal).

- the trace for the one damping policy (:func:`~headwater.curvature.base.default_damping`)
  from a seeded Hutchinson estimate where ``M`` is only available as products;
- the warning for an indefinite, (nearly) undamped system;
- extreme eigenvalues by a short Lanczos run (LiSSA's scale, indefiniteness checks);
- subsets of a data set (mini-batches, held-out samples).
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor, nn

from headwater.curvature.base import default_damping
from headwater.curvature.operators import CurvatureProduct, MatrixKind, curvature_matvec
from headwater.curvature.solvers import MatVec, lanczos
from headwater.data import DataLike
from headwater.gradients.flat import ParamLayout
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = [
    "CHUNK_SIZE",
    "BoundOperator",
    "check_layout",
    "extreme_eigenvalues",
    "hutchinson_trace",
    "rademacher",
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


def warn_if_indefinite(
    name: str,
    kind: MatrixKind,
    smallest: float,
    damping: float,
    *,
    what: str = "smallest eigenvalue",
    hint: str = "",
) -> None:
    """Warn when ``smallest + damping <= 0``: the damped system is not positive definite.
    A NaN/inf ``smallest`` is not a definiteness question: the data or the model gave
    non-finite values, which the gradient checks report as an error naming the example."""
    if smallest + damping > 0 or not math.isfinite(smallest):
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


class BoundOperator:
    """``M`` (undamped, with weight decay) of ``model`` on ``data``, re-created on demand.

    Matrix-free curvatures keep one of these instead of a stored matrix: each
    product streams over ``data`` (see :func:`~headwater.curvature.operators.curvature_matvec`):
    from stored per-example output Jacobians (GGN) when they fit in ``JACOBIAN_MB``
    (1 GiB) and a forward pass is dear (``JACOBIAN_MIN_FLOPS``), else reusing each chunk's linearisation when all of them fit in ``CACHE_MB``
    (512 MiB), else rebuilding it, so memory is ``O(K·P + chunk·activations)`` whatever
    ``n_train`` is; ``product`` says which. It holds references to the model, task and
    data, so it lives only in the current process.
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
        self.matvec: CurvatureProduct = curvature_matvec(
            model, task, data, kind, chunk_size=chunk_size
        )
        self.product = self.matvec.method  # how each product is computed, and why
        self.layout = ParamLayout.of(task.parameters(model))
        ref = next(iter(task.parameters(model).values()))
        self.dtype, self.device = ref.dtype, ref.device

    def default_damping(
        self, *, probes: int, seed: int, progress: ProgressFn | None = None
    ) -> float:
        """The library's default damping, from a Hutchinson estimate of ``trace(M)/P``."""
        p = self.layout.num_params
        trace = hutchinson_trace(
            self.matvec,
            p,
            probes=probes,
            seed=seed,
            dtype=self.dtype,
            device=self.device,
            progress=progress,
        )
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
