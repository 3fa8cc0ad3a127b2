"""Matrix-free numerical routines: CG, LiSSA, Lanczos, Arnoldi and Nyström.

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

MatVec = Callable[[Tensor], Tensor]
"""``matvec(V [K, P]) -> A V [K, P]``: a symmetric operator applied to each row."""

StepMatVec = Callable[[Tensor, int], Tensor]
"""``matvec(V [K, P], step) -> A_step V [K, P]``: a possibly stochastic operator."""

_BREAKDOWN_TOL = 1e-12  # Krylov breakdown: |residual| <= this * |A| estimate
_LISSA_BLOWUP = 1e6  # LiSSA divergence: |x_t| > this * |b|
_DGKS = 0.5 ** 0.5  # reorthogonalise again when a pass leaves less than this share of |w|


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
            ``x_t / scale`` after each step, averaged over rows.
        relative_change: Largest relative change ``|x_T - x_{T-1}| / |x_T|`` of the
            last step over rows and repeats.
        converged: ``relative_change < tol``. A heuristic: with a slowly contracting
            recursion the last change can be small while the error is not.
    """

    norms: Tensor
    relative_change: float
    converged: bool


@dataclass(frozen=True)
class LanczosInfo:
    """Diagnostics of :func:`lanczos`.

    Attributes:
        iterations: Lanczos steps taken (the size of the tridiagonal matrix).
        breakdown: Whether the Krylov space became invariant (``beta ~ 0``), which
            ends the run, possibly before ``n_iter``; the Ritz pairs are then exact.
        ritz_residuals: ``Tensor [k]`` (float64), ``|A y_i - theta_i y_i|``
            estimated as ``beta_m |s_{m,i}|``, in the order of the eigenvalues.
        converged: ``Tensor [k]`` (bool), ``ritz_residuals <= tol * max |theta|``.
    """

    iterations: int
    breakdown: bool
    ritz_residuals: Tensor
    converged: Tensor


@dataclass(frozen=True)
class ArnoldiInfo:
    """Diagnostics of :func:`arnoldi`.

    Attributes:
        iterations: Arnoldi steps taken (the size of the square Hessenberg matrix).
        breakdown: Whether the Krylov space became invariant (``h_{m+1,m} ~ 0``),
            which ends the run, possibly before ``n_iter``; the Ritz pairs are then exact.
        ritz_residuals: ``Tensor [k]`` (float64), ``|A y_i - theta_i y_i|``
            estimated as ``h_{m+1,m} |s_{m,i}|``, in the order of the eigenvalues.
        converged: ``Tensor [k]`` (bool), ``ritz_residuals <= tol * max |theta|``.
    """

    iterations: int
    breakdown: bool
    ritz_residuals: Tensor
    converged: Tensor


# ----------------------------------------------------------------------------- validation


def _check_batch(name: str, value: object, dim: int | None = None) -> Tensor:
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


def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"`{name}` must be an integer >= {minimum}, got {value!r}")
    return value


def _check_real(name: str, value: object, minimum: float, strict: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value < minimum or (strict and value == minimum):
        relation = ">" if strict else ">="
        raise ValueError(f"`{name}` must be a finite number {relation} {minimum}, got {value!r}")
    return float(value)


def _resolve(
    dim: object, dtype: torch.dtype | None, device: torch.device | str | None
) -> tuple[int, torch.dtype, torch.device]:
    dim = _check_int("dim", dim, 1)
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"`dtype` must be a floating-point torch.dtype, got {dtype!r}")
    return dim, dtype, torch.device("cpu" if device is None else device)


def _apply(matvec: Callable[..., Tensor], V: Tensor, where: str, *extra: int) -> Tensor:
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
            "model's loss and parameters for NaN/inf, or use a wider `dtype`", non_finite=True
        )
    return out


def _start_vector(dim: int, seed: int, device: torch.device) -> Tensor:
    """A unit Gaussian vector ``[P]`` in float64, the same for a seed on every device."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(dim, generator=generator, dtype=torch.float64)
    return (q / q.norm()).to(device)


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

    Returns:
        ``X [K, P]`` (dtype and device of ``B``) and a :class:`CGInfo`. Rows that
        hit ``max_iter`` are returned unconverged, flagged in the info.

    Raises:
        ValueError: On a bad argument, on non-positive curvature ``p^T A' p <= 0``
            (``A + damping I`` is not positive definite: increase ``damping``) or a
            preconditioner that is not positive definite.
        RuntimeError: If ``matvec`` or the iteration produces NaN/inf.
    """
    B = _check_batch("B", B)
    damping = _check_real("damping", damping, 0.0)
    tol = _check_real("tol", tol, 0.0)
    max_iter = 10 * B.shape[1] if max_iter is None else _check_int("max_iter", max_iter, 1)
    X = torch.zeros_like(B) if x0 is None else _check_x0(x0, B)

    def damped(V: Tensor, it: int) -> Tensor:
        return _apply(matvec, V, f"CG iteration {it}") + damping * V

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
    x0 = _check_batch("x0", x0)
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
    tol: float = 1e-3,
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

    Args:
        matvec: ``matvec(V [K, P], step) -> A_step V``, may be stochastic: ``step``
            is the global step index ``repeat * depth + t`` (``0 <= step <
            repeats * depth``), which the caller uses to pick a mini-batch (e.g.
            ``batches[step % n_batches]``) so that runs are reproducible.
        B: ``Tensor [K, P]``, right-hand sides; sets device and dtype.
        depth: Recursion steps per repeat (``>= 1``).
        scale: ``scale > 0``; must exceed the top eigenvalue of ``A + damping I``
            (of every mini-batch operator when stochastic).
        repeats: Independent recursions averaged (``>= 1``).
        damping: ``damping >= 0`` added to the diagonal of ``A``.
        tol: Threshold on the last relative change for the ``converged`` flag.

    Returns:
        ``X [K, P]`` (dtype and device of ``B``) and a :class:`LissaInfo`.

    Raises:
        ValueError: On a bad argument.
        RuntimeError: If ``matvec`` returns NaN/inf or the recursion diverges
            (``|x_t| > 1e6 |b|`` or non-finite); the message names ``scale``, or
            ``damping`` when the operator has a negative eigenvalue.
    """
    B = _check_batch("B", B)
    depth = _check_int("depth", depth, 1)
    repeats = _check_int("repeats", repeats, 1)
    scale = _check_real("scale", scale, 0.0, strict=True)
    damping = _check_real("damping", damping, 0.0)
    tol = _check_real("tol", tol, 0.0)

    limit = _LISSA_BLOWUP * B.norm(dim=1)  # [K]
    total = torch.zeros_like(B)  # [K, P]
    norms = torch.zeros(repeats, depth, dtype=torch.float64)
    relative_change = 0.0
    for r in range(repeats):
        X = B.clone()  # [K, P]
        for t in range(depth):
            step = r * depth + t
            AX = _apply(matvec, X, f"LiSSA step {step}", step) + damping * X
            X_new = B + X - AX / scale
            x_norm = X_new.norm(dim=1)
            bad = ~torch.isfinite(x_norm) | (x_norm > limit)
            if bool(bad.any()):
                raise _lissa_divergence(X, AX, bad, step, x_norm, scale, damping)
            change = (X_new - X).norm(dim=1) / x_norm.clamp_min(torch.finfo(B.dtype).tiny)
            X = X_new
            norms[r, t] = (x_norm / scale).mean().item()
        relative_change = max(relative_change, change.max().item())
        total += X
    info = LissaInfo(norms=norms, relative_change=relative_change, converged=relative_change < tol)
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


# ----------------------------------------------------------------------------- Lanczos


def lanczos(
    matvec: MatVec,
    dim: int,
    *,
    n_iter: int,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    tol: float = 1e-6,
) -> tuple[Tensor, Tensor, LanczosInfo]:
    """Ritz pairs of a symmetric operator by Lanczos with full reorthogonalisation.

    From a seeded unit Gaussian ``q_1``, builds an orthonormal basis ``Q_m`` of the
    Krylov space ``span{q_1, A q_1, ..., A^{m-1} q_1}`` and the tridiagonal
    ``T_m = Q_m^T A Q_m`` (diagonal ``alpha_j = q_j^T A q_j``, off-diagonal
    ``beta_j = |w_j|``), where ``w_j = A q_j`` is orthogonalised against all of
    ``Q_j`` by classical Gram-Schmidt applied twice (in float64). If
    ``T_m = S diag(theta) S^T``, the Ritz pairs are ``(theta_i, Q_m^T s_i)``. Stops
    early at breakdown (``beta_j ~ 0``: the Krylov space is invariant). Lanczos
    1950; Paige 1972; Golub & Van Loan, "Matrix Computations", section 10.1.

    Memory: the basis holds ``n_iter * P`` float64 numbers.

    Args:
        matvec: The symmetric operator ``A``; called with one row at a time (K = 1).
        dim: P, the operator's size.
        n_iter: Lanczos steps, ``1 <= n_iter <= dim``.
        seed: Seed of the start vector.
        dtype: Dtype of the vectors passed to ``matvec`` and of the returned
            eigenvectors; default ``torch.get_default_dtype()``.
        device: Device of the vectors; default CPU.
        tol: Relative Ritz residual below which a pair is flagged converged.

    Returns:
        ``eigvals [k]`` sorted descending, ``eigvecs [k, P]`` (rows, ``dtype``) and a
        :class:`LanczosInfo`, with ``k`` the number of steps taken (``n_iter``
        unless the run broke down).

    Raises:
        ValueError: On a bad argument.
        RuntimeError: If ``matvec`` returns NaN/inf.
    """
    dim, dtype, device = _resolve(dim, dtype, device)
    n_iter = _check_n_iter(n_iter, dim)
    tol = _check_real("tol", tol, 0.0)
    basis = torch.zeros(n_iter, dim, dtype=torch.float64, device=device)  # [m, P]
    alphas: list[float] = []
    betas: list[float] = []
    q = _start_vector(dim, seed, device)
    norm_est = 0.0
    breakdown = False
    for j in range(n_iter):
        basis[j] = q
        w = _apply(matvec, q.to(dtype)[None], f"Lanczos step {j}")[0].double()
        norm_est = max(norm_est, w.norm().item())
        alpha = float(q @ w)
        w = w - alpha * q
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        for _ in range(2):  # full reorthogonalisation; a second pass only if the first
            before = w.norm()  # removed most of w (Daniel, Gragg, Kaufman & Stewart 1976)
            h = basis[: j + 1] @ w  # [j+1]
            w = w - h @ basis[: j + 1]
            alpha += h[j].item()
            if w.norm() > _DGKS * before:
                break
        alphas.append(alpha)
        betas.append(w.norm().item())
        if betas[-1] <= _BREAKDOWN_TOL * norm_est:
            breakdown = True
            break
        q = w / betas[-1]
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    off = torch.tensor(betas[: m - 1], dtype=torch.float64)
    T += torch.diag(off, 1) + torch.diag(off, -1)
    theta, S = torch.linalg.eigh(T)
    order = torch.argsort(theta, descending=True)
    return _ritz(theta, S, order, basis[:m], betas[-1], breakdown, tol, dtype, LanczosInfo)


def _check_n_iter(n_iter: object, dim: int) -> int:
    n_iter = _check_int("n_iter", n_iter, 1)
    if n_iter > dim:
        raise ValueError(f"`n_iter` must be <= dim = {dim} (the Krylov basis size), got {n_iter}")
    return n_iter


def _ritz(
    theta: Tensor,
    S: Tensor,
    order: Tensor,
    basis: Tensor,
    last_beta: float,
    breakdown: bool,
    tol: float,
    dtype: torch.dtype,
    info_type: type[LanczosInfo] | type[ArnoldiInfo],
) -> tuple[Tensor, Tensor, LanczosInfo | ArnoldiInfo]:
    """Ritz values/vectors in ``order`` plus their residual estimates."""
    eigvals = theta[order]  # [k]
    eigvecs = S[:, order].T.to(basis.device) @ basis  # [k, P]
    residuals = last_beta * S[-1, order].abs()  # [k]
    converged = residuals <= tol * eigvals.abs().max()
    info = info_type(
        iterations=basis.shape[0],
        breakdown=breakdown,
        ritz_residuals=residuals,
        converged=converged,
    )
    return eigvals.to(device=basis.device, dtype=dtype), eigvecs.to(dtype), info


# ----------------------------------------------------------------------------- Arnoldi


def arnoldi(
    matvec: MatVec,
    dim: int,
    *,
    n_iter: int,
    top_k: int,
    seed: int = 0,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    tol: float = 1e-6,
) -> tuple[Tensor, Tensor, ArnoldiInfo]:
    """Top eigenpairs (by ``|lambda|``) of a symmetric operator by Arnoldi iteration.

    Schioppa et al. 2022, "Scaling Up Influence Functions", Algorithm 1: from a
    seeded unit Gaussian ``v_1``, for ``i = 1..m``: ``w = A v_i``; for ``j <= i``,
    ``h_{ji} = v_j^T w``, ``w -= h_{ji} v_j`` (here classical Gram-Schmidt applied twice,
    vectorised, in float64: as orthonormal to rounding as the paper's modified
    Gram-Schmidt, without a Python loop over the basis); ``h_{i+1,i} = |w|``,
    ``v_{i+1} = w / h_{i+1,i}``. Since ``A`` is symmetric, the square part
    ``H_m = V_m^T A V_m`` of the upper Hessenberg matrix is symmetrised,
    ``(H_m + H_m^T) / 2 = S diag(theta) S^T``, and the ``top_k`` pairs by
    ``|theta|`` are kept, eigenvectors ``V_m^T s_i``. Stops early at breakdown.

    Memory: the basis holds ``n_iter * P`` float64 numbers.

    Args:
        matvec: The symmetric operator ``A``; called with one row at a time (K = 1).
        dim: P, the operator's size.
        n_iter: Arnoldi steps, ``top_k <= n_iter <= dim``.
        top_k: Number of eigenpairs kept (``>= 1``).
        seed: Seed of the start vector.
        dtype: Dtype of the vectors passed to ``matvec`` and of the returned
            eigenvectors; default ``torch.get_default_dtype()``.
        device: Device of the vectors; default CPU.
        tol: Relative Ritz residual below which a pair is flagged converged.

    Returns:
        ``eigvals [k]`` sorted by ``|lambda|`` descending, ``eigvecs [k, P]`` (rows,
        ``dtype``) and an :class:`ArnoldiInfo`; ``k = top_k`` unless the run broke
        down after fewer steps (then ``k`` is that number of steps).

    Raises:
        ValueError: On a bad argument.
        RuntimeError: If ``matvec`` returns NaN/inf.
    """
    dim, dtype, device = _resolve(dim, dtype, device)
    n_iter = _check_n_iter(n_iter, dim)
    top_k = _check_int("top_k", top_k, 1)
    if top_k > n_iter:
        raise ValueError(f"`top_k` must be <= n_iter = {n_iter}, got {top_k}")
    tol = _check_real("tol", tol, 0.0)
    basis = torch.zeros(n_iter, dim, dtype=torch.float64, device=device)  # [m, P]
    H = torch.zeros(n_iter + 1, n_iter, dtype=torch.float64)  # upper Hessenberg
    v = _start_vector(dim, seed, device)
    norm_est = 0.0
    breakdown = False
    m = 0
    for i in range(n_iter):
        basis[i] = v
        w = _apply(matvec, v.to(dtype)[None], f"Arnoldi step {i}")[0].double()
        norm_est = max(norm_est, w.norm().item())
        for _ in range(2):  # Gram-Schmidt, twice (classical, vectorised: CGS2)
            h = basis[: i + 1] @ w  # [i+1]
            w = w - h @ basis[: i + 1]
            H[: i + 1, i] += h.cpu()
        H[i + 1, i] = w.norm().item()
        m = i + 1
        if H[i + 1, i].item() <= _BREAKDOWN_TOL * norm_est:
            breakdown = True
            break
        v = w / H[i + 1, i].item()
    H_square = H[:m, :m]
    theta, S = torch.linalg.eigh((H_square + H_square.T) / 2)
    order = torch.argsort(theta.abs(), descending=True)[:top_k]
    last = H[m, m - 1].item()
    return _ritz(theta, S, order, basis[:m], last, breakdown, tol, dtype, ArnoldiInfo)


# ----------------------------------------------------------------------------- Nyström


def nystrom(
    matvec: MatVec,
    dim: int,
    *,
    rank: int,
    seed: int = 0,
    oversample: int = 10,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """Top eigenpairs of a PSD operator from a randomized Nyström approximation.

    With a seeded Gaussian test matrix orthonormalised to ``Omega`` (P x l,
    ``l = min(rank + oversample, P)``), ``Y = A Omega`` and a small shift
    ``nu = sqrt(P) eps |Y|_2`` (``eps`` of ``dtype``) for stability,

        Y_nu = Y + nu Omega,  C C^T = Omega^T Y_nu (Cholesky),
        B = Y_nu C^{-T} = U Sigma W^T (thin SVD),  Lambda = max(Sigma^2 - nu, 0),

    so ``A ~ A_nys = U Lambda U^T = (A Omega)(Omega^T A Omega)^+(A Omega)^T``; the
    top ``rank`` pairs are returned. Exact when ``l = P`` (``rank = P``). Tropp,
    Yurtsever, Udell & Cevher 2017, "Fixed-Rank Approximation of a Positive-
    Semidefinite Matrix from Streaming Data"; Frangella, Tropp & Udell 2021,
    "Randomized Nyström Preconditioning", Algorithm 2.1.

    Args:
        matvec: The symmetric positive semi-definite operator ``A``; called once
            with ``l`` rows.
        dim: P, the operator's size.
        rank: Number of eigenpairs returned, ``1 <= rank <= dim``.
        seed: Seed of the test matrix.
        oversample: Extra sketch columns beyond ``rank`` (``>= 0``).
        dtype: Dtype of the vectors passed to ``matvec`` and of the results;
            default ``torch.get_default_dtype()``.
        device: Device of the vectors; default CPU.

    Returns:
        ``eigvals [rank]`` (descending, ``>= 0``) and ``eigvecs [rank, P]`` (rows).

    Raises:
        ValueError: On a bad argument, or if ``A`` is not positive semi-definite
            (the Cholesky factorisation of the sketch fails).
        RuntimeError: If ``matvec`` returns NaN/inf.
    """
    dim, dtype, device = _resolve(dim, dtype, device)
    rank = _check_int("rank", rank, 1)
    if rank > dim:
        raise ValueError(f"`rank` must be <= dim = {dim}, got {rank}")
    oversample = _check_int("oversample", oversample, 0)
    sketch = min(rank + oversample, dim)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    gaussian = torch.randn(dim, sketch, generator=generator, dtype=torch.float64)
    omega = torch.linalg.qr(gaussian).Q.T.contiguous().to(device)  # [l, P], orthonormal rows
    Y = _apply(matvec, omega.to(dtype), "Nystrom sketch").double()  # [l, P]
    y_norm = torch.linalg.matrix_norm(Y, ord=2).item()
    if y_norm == 0.0:  # the zero operator: any orthonormal vectors are eigenvectors
        zeros = torch.zeros(rank, dtype=dtype, device=device)
        return zeros, omega[:rank].to(dtype)
    shift = math.sqrt(dim) * torch.finfo(dtype).eps * y_norm
    Y_shift = Y + shift * omega  # [l, P]
    core = omega @ Y_shift.T  # [l, l]
    L, failed = torch.linalg.cholesky_ex((core + core.T) / 2)
    if int(failed) != 0:
        raise ValueError(
            "Nystrom needs a positive semi-definite operator, but the sketch Omega^T A Omega is "
            "not (its Cholesky factorisation failed): use the GGN or Fisher curvature, or "
            "`lanczos`/`arnoldi` for an indefinite Hessian"
        )
    B_rows = torch.linalg.solve_triangular(L, Y_shift, upper=False)  # [l, P] = (Y_nu C^{-T})^T
    _, sigma, Vh = torch.linalg.svd(B_rows, full_matrices=False)
    eigvals = (sigma[:rank] ** 2 - shift).clamp_min(0.0)
    return eigvals.to(dtype), Vh[:rank].to(dtype)


def _check_eigen(eigvals: object, eigvecs: object) -> tuple[Tensor, Tensor]:
    if not isinstance(eigvals, Tensor) or eigvals.ndim != 1:
        raise ValueError("`eigvals` must be a 1-D tensor [r]")
    if not isinstance(eigvecs, Tensor) or eigvecs.ndim != 2:
        raise ValueError("`eigvecs` must be a 2-D tensor [r, P] of row eigenvectors")
    if eigvecs.shape[0] != eigvals.shape[0]:
        raise ValueError(
            f"`eigvecs` must have one row per eigenvalue ({eigvals.shape[0]}), "
            f"got shape {tuple(eigvecs.shape)}"
        )
    if not (torch.isfinite(eigvals).all() and torch.isfinite(eigvecs).all()):
        raise ValueError("`eigvals` and `eigvecs` must be finite")
    return eigvals, eigvecs


def nystrom_preconditioner(eigvals: Tensor, eigvecs: Tensor, damping: float) -> MatVec:
    """The randomized Nyström preconditioner for ``A + damping I``, for :func:`conjugate_gradient`.

    With ``A ~ U Lambda U^T`` (from :func:`nystrom`, rank r, smallest kept eigenvalue
    ``lambda_r``) and ``mu = damping``,

        P^{-1} = (lambda_r + mu) U (Lambda + mu I)^{-1} U^T + (I - U U^T).

    Frangella, Tropp & Udell 2021, "Randomized Nyström Preconditioning", eq. (5.3).
    Pass the same ``damping`` to :func:`conjugate_gradient`.

    Args:
        eigvals: ``Tensor [r]``, the approximate eigenvalues (``lambda_r`` is their
            minimum).
        eigvecs: ``Tensor [r, P]``, orthonormal rows ``U^T``.
        damping: ``mu >= 0``; ``eigvals + damping`` must be positive.

    Returns:
        A callable ``R [K, P] -> P^{-1} R [K, P]`` in the dtype and device of ``R``.

    Raises:
        ValueError: On a bad argument or ``min(eigvals) + damping <= 0``.
    """
    eigvals, eigvecs = _check_eigen(eigvals, eigvecs)
    damping = _check_real("damping", damping, 0.0)
    shifted = eigvals.double() + damping  # [r]
    if eigvals.numel() == 0 or not bool((shifted > 0).all()):
        raise ValueError(
            "the Nystrom preconditioner needs at least one eigenpair and eigvals + damping > 0; "
            f"increase `damping` (now {damping:g})"
        )
    weights = shifted.min() / shifted  # [r], (lambda_r + mu) / (lambda_i + mu)

    def apply(R: Tensor) -> Tensor:
        U = eigvecs.to(device=R.device, dtype=R.dtype)  # [r, P]
        coeff = R @ U.T  # [K, r]
        w = weights.to(device=R.device, dtype=R.dtype)
        return R + (coeff * (w - 1)) @ U

    return apply


# ----------------------------------------------------------------------------- low-rank solve


def lowrank_solve(
    eigvals: Tensor, eigvecs: Tensor, V: Tensor, *, damping: float, residual: bool
) -> Tensor:
    """Solve ``(A + damping I) x = v`` per row with a low-rank ``A ~ U diag(l) U^T``.

    Truncated form (``residual=False``, Schioppa et al. 2022, "Scaling Up Influence
    Functions"): discarded directions contribute zero,

        x = U diag(1 / (l + damping)) U^T v.

    Residual form (``residual=True``): the discarded subspace is treated as having
    eigenvalue 0, i.e. the damped identity,

        x = U diag(1 / (l + damping)) U^T v + (v - U U^T v) / damping.

    Args:
        eigvals: ``Tensor [r]``, eigenvalues ``l`` (may be negative).
        eigvecs: ``Tensor [r, P]``, orthonormal rows ``U^T``.
        V: ``Tensor [K, P]``, right-hand sides; sets device and dtype.
        damping: ``damping >= 0`` (``> 0`` for the residual form).
        residual: Whether to use the residual form.

    Returns:
        ``X [K, P]`` in the dtype and device of ``V``.

    Raises:
        ValueError: On bad shapes, ``damping <= 0`` with ``residual=True``, or an
            eigenvalue with ``l + damping == 0``.
    """
    eigvals, eigvecs = _check_eigen(eigvals, eigvecs)
    V = _check_batch("V", V, dim=eigvecs.shape[1])
    damping = _check_real("damping", damping, 0.0)
    if residual and damping <= 0:
        raise ValueError(
            "`damping` must be > 0 with residual=True (the discarded subspace is divided by it), "
            f"got {damping:g}"
        )
    shifted = eigvals.to(device=V.device, dtype=V.dtype) + damping  # [r]
    if bool((shifted == 0).any()):
        raise ValueError(
            f"an eigenvalue equals -damping, so l + damping = 0: change `damping` (now {damping:g})"
        )
    U = eigvecs.to(device=V.device, dtype=V.dtype)  # [r, P]
    coeff = V @ U.T  # [K, r]
    X = (coeff / shifted) @ U
    if residual:
        X = X + (V - coeff @ U) / damping
    return X
