"""Matrix-free numerical routines: CG and LiSSA here; Lanczos, Arnoldi and Nyström in
:mod:`headwater.curvature.eigensolvers` (re-exported).

Every routine here takes a ``matvec`` callable, never a model, so the curvature
classes (``CG``, ``LiSSA``, ``Lanczos``, ``Arnoldi``, ``Nystrom``) can wrap any
operator: a Hessian/GGN/Fisher product, a dense matrix in a test, a sum of both.

Shared conventions (documented once, here):

- **Vectors are rows.** A batch of K vectors of length P is a ``Tensor [K, P]``.
  ``matvec(V) -> Tensor [K, P]`` applies a symmetric P x P operator ``A`` to every
  row of ``V`` (in column notation it returns ``(A V^T)^T = V A``).
- **Device and dtype follow the inputs.** The iterative solvers (CG, LiSSA) run
  in the dtype of the right-hand sides; the eigen-solvers keep their Krylov basis
  and small factorisations in float64, call ``matvec`` with vectors of the
  requested ``dtype`` and cast the results back to it.
- **Randomness is local.** Random routines take ``seed: int`` and draw from a
  private CPU ``torch.Generator`` (then move to ``device``), so the same seed gives
  the same numbers on every device and the global RNG is never touched.
- **Diagnostics and errors.** Each solver returns its result plus a frozen
  dataclass of diagnostics. NaN/inf or divergence raises an error whose message
  names the setting to change; bad arguments raise ``ValueError`` naming the
  argument.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from headwater.curvature._solver_common import (
    LISSA_BLOWUP,
    MatVec,
    StepMatVec,
    apply,
    check_batch,
    check_int,
    check_real,
)
from headwater.curvature.eigensolvers import (
    ArnoldiInfo,
    LanczosInfo,
    arnoldi,
    lanczos,
    lowrank_solve,
    nystrom,
    nystrom_preconditioner,
)
from headwater.errors import NumericalError

__all__ = [
    "ArnoldiInfo",
    "CGInfo",
    "LanczosInfo",
    "LissaInfo",
    "MatVec",
    "StepMatVec",
    "arnoldi",
    "conjugate_gradient",
    "lanczos",
    "lissa",
    "lowrank_solve",
    "nystrom",
    "nystrom_preconditioner",
]


# ----------------------------------------------------------------------------- diagnostics


@dataclass(frozen=True)
class CGInfo:
    """Diagnostics of :func:`conjugate_gradient`.

    Attributes:
        iterations: Largest number of iterations run by any row.
        iterations_per_row: ``Tensor [K]`` (int64), iterations run by each row.
        residuals: ``Tensor [K]``, final relative residual
            ``|b - (A + damping I) x| / |b|`` of each row (absolute when ``b = 0``),
            from the CG recurrence.
        converged_rows: ``Tensor [K]`` (bool), rows that reached ``tol``.
        converged: Whether every row reached ``tol``.
    """

    iterations: int
    iterations_per_row: Tensor
    residuals: Tensor
    converged_rows: Tensor
    converged: bool


@dataclass(frozen=True)
class LissaInfo:
    """Diagnostics of :func:`lissa`.

    Attributes:
        norms: ``Tensor [repeats, depth]`` (float64), norm of the current estimate
            ``x_t / scale`` after each step, averaged over rows; NaN after every row stopped.
        steps: recursion steps run in the longest repeat (``<= depth``).
        residual: worst relative residual ``|b - A' x_T / scale| / |b|`` over rows and
            repeats, measured at each row's last step (it is ``|x_{T+1} - x_T| / |b|``, so
            it costs nothing; the returned estimate is one step further). With a
            stochastic ``matvec`` it is one mini-batch's residual.
        converged: ``residual <= tol``.
    """

    norms: Tensor
    steps: int
    residual: float
    converged: bool


# ----------------------------------------------------------------------------- CG


def conjugate_gradient(
    matvec: MatVec,
    B: Tensor,
    *,
    damping: float = 0.0,
    tol: float = 1e-8,
    max_iter: int | None = None,
    preconditioner: MatVec | None = None,
    x0: Tensor | None = None,
    callback: Callable[[int, Tensor], None] | None = None,
) -> tuple[Tensor, CGInfo]:
    """Solve ``(A + damping I) x_k = b_k`` for every row by (preconditioned) CG.

    K independent conjugate-gradient runs, batched: each row has its own step
    sizes and stops on its own once ``|b_k - (A + damping I) x_k| <= tol |b_k|``;
    later ``matvec`` calls only receive the rows still running. With a
    preconditioner ``M`` (``preconditioner(R) = M^{-1} R`` row-wise) the update is

        alpha = r^T z / p^T A' p,  x += alpha p,  r -= alpha A' p,
        z = M^{-1} r,  beta = r_new^T z_new / r^T z,  p = z + beta p,

    with ``A' = A + damping I``. Hestenes & Stiefel 1952; Koh & Liang 2017 use CG
    for inverse-Hessian-vector products.

    Args:
        matvec: The symmetric operator ``A`` (see the module docstring).
        B: ``Tensor [K, P]``, right-hand sides; sets device and dtype.
        damping: ``damping >= 0`` added to the diagonal of ``A``.
        tol: Relative residual at which a row stops (``>= 0``). In float32 use
            ``tol >= ~1e-6``: smaller residuals are below rounding.
        max_iter: Iteration cap per row; default ``10 * P``.
        preconditioner: Symmetric positive definite ``R [K, P] -> M^{-1} R``,
            e.g. :func:`nystrom_preconditioner`; default none.
        x0: ``Tensor [K, P]``, starting point; default zeros.
        callback: called after every iteration with ``(iteration, relative residuals [K])``.

    Returns:
        ``X [K, P]`` (dtype and device of ``B``) and a :class:`CGInfo`. Rows that
        hit ``max_iter`` are returned unconverged, flagged in the info.

    Raises:
        ValueError: On a bad argument, on non-positive curvature ``p^T A' p <= 0``
            (``A + damping I`` is not positive definite: increase ``damping``) or a
            preconditioner that is not positive definite.
        RuntimeError: If ``matvec`` or the iteration produces NaN/inf.
    """
    B = check_batch("B", B)
    damping = check_real("damping", damping, 0.0)
    tol = check_real("tol", tol, 0.0)
    max_iter = 10 * B.shape[1] if max_iter is None else check_int("max_iter", max_iter, 1)
    X = torch.zeros_like(B) if x0 is None else _check_x0(x0, B)

    def damped(V: Tensor, it: int) -> Tensor:
        return apply(matvec, V, f"CG iteration {it}") + damping * V

    b_norm = B.norm(dim=1)
    denom = torch.where(b_norm > 0, b_norm, torch.ones_like(b_norm))  # [K]
    R = B - damped(X, 0) if x0 is not None else B.clone()  # [K, P]
    rel = R.norm(dim=1) / denom
    done = rel <= tol
    iters = torch.zeros(B.shape[0], dtype=torch.long, device=B.device)
    Z = _precondition(preconditioner, R)
    rz = (R * Z).sum(dim=1)  # [K]
    P_dir = Z.clone()  # [K, P]
    for it in range(1, max_iter + 1):
        active = (~done).nonzero().squeeze(1)
        if active.numel() == 0:
            break
        p = P_dir[active]
        Ap = damped(p, it)
        pAp = (p * Ap).sum(dim=1)
        if not bool((pAp > 0).all()):
            raise ValueError(
                f"CG met non-positive curvature p^T (A + damping I) p = {pAp.min().item():.3g} "
                f"at iteration {it}: the operator is not positive definite; increase `damping` "
                f"(now {damping:g}) or use a positive semi-definite curvature such as the GGN"
            )
        alpha = (rz[active] / pAp)[:, None]
        X[active] += alpha * p
        R[active] -= alpha * Ap
        rel[active] = R[active].norm(dim=1) / denom[active]
        iters[active] = it
        if not bool(torch.isfinite(rel).all()):
            raise NumericalError(
                f"CG produced NaN/inf at iteration {it}: the system is too ill-conditioned for "
                f"{B.dtype}; increase `damping` (now {damping:g})"
            )
        done[active] = rel[active] <= tol
        if callback is not None:
            callback(it, rel)
        still = active[~done[active]]
        if still.numel() > 0:
            _cg_direction(preconditioner, R, P_dir, rz, still)
    info = CGInfo(
        iterations=int(iters.max().item()),
        iterations_per_row=iters,
        residuals=rel,
        converged_rows=done,
        converged=bool(done.all()),
    )
    return X, info


def _check_x0(x0: object, B: Tensor) -> Tensor:
    x0 = check_batch("x0", x0)
    if x0.shape != B.shape:
        raise ValueError(f"`x0` must have the shape of `B` {tuple(B.shape)}, got {tuple(x0.shape)}")
    return x0.to(device=B.device, dtype=B.dtype).clone()


def _precondition(preconditioner: MatVec | None, R: Tensor) -> Tensor:
    if preconditioner is None:
        return R.clone()
    Z = preconditioner(R)
    if not isinstance(Z, Tensor) or Z.shape != R.shape:
        raise ValueError("`preconditioner` must map [K, P] to [K, P]")
    if not torch.isfinite(Z).all():
        raise NumericalError("`preconditioner` returned NaN or inf: check its `damping`")
    return Z


def _cg_direction(
    preconditioner: MatVec | None, R: Tensor, P_dir: Tensor, rz: Tensor, rows: Tensor
) -> None:
    """Update the search directions ``P_dir`` and ``rz`` of ``rows`` in place."""
    r = R[rows]
    z = _precondition(preconditioner, r)
    rz_new = (r * z).sum(dim=1)
    if not bool((rz_new > 0).all()):
        raise ValueError(
            "`preconditioner` is not positive definite: r^T M^{-1} r = "
            f"{rz_new.min().item():.3g} <= 0"
        )
    beta = (rz_new / rz[rows])[:, None]
    P_dir[rows] = z + beta * P_dir[rows]
    rz[rows] = rz_new


# ----------------------------------------------------------------------------- LiSSA


def lissa(
    matvec: StepMatVec,
    B: Tensor,
    *,
    depth: int,
    scale: float,
    repeats: int = 1,
    damping: float = 0.0,
    tol: float = 0.0,
    callback: Callable[[int, Tensor], None] | None = None,
) -> tuple[Tensor, LissaInfo]:
    """Estimate ``(A + damping I)^{-1} b`` for every row by the LiSSA recursion.

    With ``A' = A + damping I`` each repeat runs, from ``x_0 = b``,

        x_{t+1} = b + (I - A'_t / scale) x_t,        t = 0, ..., depth - 1,

    a truncated Neumann series with ``x_t / scale -> A'^{-1} b`` when every
    eigenvalue of ``A' / scale`` lies in (0, 2) (so ``scale`` above the top
    eigenvalue of ``A'`` is safe). The result ``x_depth / scale`` is averaged over
    the repeats. Agarwal, Bullins & Hazan 2017, "Second-Order Stochastic
    Optimization for Machine Learning in Linear Time"; Koh & Liang 2017 (who
    divide by the scale, as here).

    A step's change ``x_{t+1} - x_t = b - A'_t x_t / scale`` is the residual of the
    estimate ``x_t / scale``, so with ``tol > 0`` a row stops, free of charge, at the
    first step whose relative residual is ``<= tol`` (the next rows' products shrink to
    the rows still running), as CG does.

    Args:
        matvec: ``matvec(V [K', P], step) -> A_step V``, may be stochastic: ``step``
            is the global step index ``repeat * depth + t`` (``0 <= step <
            repeats * depth``), which the caller uses to pick a mini-batch (e.g.
            ``batches[step % n_batches]``) so that runs are reproducible. ``K' <= K``:
            only the rows still running.
        B: ``Tensor [K, P]``, right-hand sides; sets device and dtype.
        depth: Recursion steps per repeat (``>= 1``; a cap when ``tol > 0``).
        scale: ``scale > 0``; must exceed the top eigenvalue of ``A + damping I``
            (of every mini-batch operator when stochastic).
        repeats: Independent recursions averaged (``>= 1``).
        damping: ``damping >= 0`` added to the diagonal of ``A``.
        tol: relative residual at which a row stops (``>= 0``; ``0``: every row runs
            ``depth`` steps, as a stochastic ``matvec`` should, whose residual is one
            mini-batch's).
        callback: called after every step with ``(step + 1, relative residuals [K])``
            (rows already stopped keep their last residual).

    Returns:
        ``X [K, P]`` (dtype and device of ``B``) and a :class:`LissaInfo`.

    Raises:
        ValueError: On a bad argument.
        RuntimeError: If ``matvec`` returns NaN/inf or the recursion diverges
            (``|x_t| > 1e6 |b|`` or non-finite); the message names ``scale``, or
            ``damping`` when the operator has a negative eigenvalue.
    """
    B = check_batch("B", B)
    depth = check_int("depth", depth, 1)
    repeats = check_int("repeats", repeats, 1)
    scale = check_real("scale", scale, 0.0, strict=True)
    damping = check_real("damping", damping, 0.0)
    tol = check_real("tol", tol, 0.0)

    b_norm = B.norm(dim=1)  # [K]
    limit = LISSA_BLOWUP * b_norm
    b_norm = b_norm.clamp_min(torch.finfo(B.dtype).tiny)
    total = torch.zeros_like(B)  # [K, P]
    norms = torch.full((repeats, depth), math.nan, dtype=torch.float64)
    residual, steps = 0.0, 0
    for r in range(repeats):
        X = B.clone()  # [K, P]
        rel = torch.full_like(b_norm, math.inf)  # [K], each row's last relative residual
        rows = torch.arange(B.shape[0], device=B.device)  # the rows still running
        for t in range(depth):
            step = r * depth + t
            Xr = X[rows]
            AX = apply(matvec, Xr, f"LiSSA step {step}", step) + damping * Xr
            X_new = B[rows] + Xr - AX / scale
            x_norm = X_new.norm(dim=1)
            bad = ~torch.isfinite(x_norm) | (x_norm > limit[rows])
            if bool(bad.any()):
                raise _lissa_divergence(Xr, AX, bad, step, x_norm, scale, damping)
            rel[rows] = (X_new - Xr).norm(dim=1) / b_norm[rows]
            X[rows] = X_new
            norms[r, t] = (X.norm(dim=1) / scale).mean().item()
            steps = max(steps, t + 1)
            if callback is not None:
                callback(step + 1, rel)
            if tol > 0:
                rows = rows[rel[rows] > tol]
                if rows.numel() == 0:
                    break
        residual = max(residual, rel.max().item())
        total += X
    info = LissaInfo(norms=norms, steps=steps, residual=residual, converged=residual <= tol)
    return total / (repeats * scale), info


def _lissa_divergence(
    X: Tensor, AX: Tensor, bad: Tensor, step: int, x_norm: Tensor, scale: float, damping: float
) -> NumericalError:
    """Build the divergence error; the Rayleigh quotient estimates the culprit eigenvalue."""
    row = int(bad.nonzero()[0, 0])
    x, ax = X[row].double(), AX[row].double()
    curvature = (x @ ax / (x @ x)).item()  # eigenvalue of A + damping I along x
    size = f"|x| = {x_norm[row].item():.3g}"
    if curvature <= 0:
        return NumericalError(
            f"LiSSA diverged at step {step} ({size}): A + damping I has a negative eigenvalue "
            f"(~{curvature:.3g}); increase `damping` (now {damping:g}) above "
            f"{damping - curvature:.3g}, or use a positive semi-definite curvature such as the GGN"
        )
    return NumericalError(
        f"LiSSA diverged at step {step} ({size}): increase `scale` (now {scale:g}) above the "
        f"top eigenvalue of A + damping I (~{curvature:.3g})"
    )
