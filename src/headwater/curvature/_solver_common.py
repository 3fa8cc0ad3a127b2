"""Shared pieces of the matrix-free routines (:mod:`headwater.curvature.solvers`,
:mod:`headwater.curvature.eigensolvers`): operator types, tolerances, argument checks."""

import math
from collections.abc import Callable

import torch
from torch import Tensor

from headwater.errors import NumericalError

__all__ = [
    "BREAKDOWN_TOL",
    "DGKS",
    "LISSA_BLOWUP",
    "MatVec",
    "StepMatVec",
    "apply",
    "check_batch",
    "check_int",
    "check_real",
    "resolve",
    "start_vector",
]

MatVec = Callable[[Tensor], Tensor]
"""``matvec(V [K, P]) -> A V [K, P]``: a symmetric operator applied to each row."""

StepMatVec = Callable[[Tensor, int], Tensor]
"""``matvec(V [K, P], step) -> A_step V [K, P]``: a possibly stochastic operator."""

BREAKDOWN_TOL = 1e-12  # Krylov breakdown: |residual| <= this * |A| estimate
LISSA_BLOWUP = 1e6  # LiSSA divergence: |x_t| > this * |b|
DGKS = 0.5**0.5  # reorthogonalise again when a pass leaves less than this share of |w|


# ----------------------------------------------------------------------------- validation


def check_batch(name: str, value: object, dim: int | None = None) -> Tensor:
    """Check that ``value`` is a finite floating ``Tensor [K, P]`` with K >= 1."""
    if not isinstance(value, Tensor) or value.ndim != 2:
        got = f"shape {tuple(value.shape)}" if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(f"`{name}` must be a 2-D tensor [K, P] of row vectors, got {got}")
    if not value.is_floating_point():
        raise ValueError(f"`{name}` must be a floating-point tensor, got {value.dtype}")
    if value.shape[0] == 0 or value.shape[1] == 0:
        raise ValueError(
            f"`{name}` must have at least one row and column, got {tuple(value.shape)}"
        )
    if dim is not None and value.shape[1] != dim:
        raise ValueError(f"`{name}` must have {dim} columns, got shape {tuple(value.shape)}")
    if not torch.isfinite(value).all():
        raise ValueError(f"`{name}` contains NaN or inf")
    return value


def check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return value


def check_real(name: str, value: object, minimum: float, strict: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"`{name}` must be a finite number {relation} {minimum}, got {value!r}")
    return float(value)


def resolve(
    dim: object, dtype: torch.dtype | None, device: torch.device | str | None
) -> tuple[int, torch.dtype, torch.device]:
    dim = check_int("dim", dim, 1)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"`dtype` must be a floating-point torch.dtype, got {dtype!r}")
    return dim, dtype, torch.device("cpu" if device is None else device)


def apply(matvec: Callable[..., Tensor], V: Tensor, where: str, *extra: int) -> Tensor:
    """Call ``matvec(V, *extra)`` and check the result's shape and finiteness."""
    out = matvec(V, *extra)
    if not isinstance(out, Tensor) or out.shape != V.shape:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"`matvec` must map [K, P] to [K, P]: got {got} for input {tuple(V.shape)} ({where})"
        )
    if not torch.isfinite(out).all():
        raise NumericalError(
            f"`matvec` returned NaN or inf ({where}): the operator is not finite; check the "
            "model's loss and parameters for NaN/inf, or use a wider `dtype`",
            non_finite=True,
        )
    return out


def start_vector(dim: int, seed: int, device: torch.device) -> Tensor:
    """A unit Gaussian vector ``[P]`` in float64, the same for a seed on every device."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(dim, generator=generator, dtype=torch.float64)
    return (q / q.norm()).to(device)
