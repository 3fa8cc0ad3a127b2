"""Matrix-free eigen-solvers: Lanczos, Arnoldi and Nyström, and the low-rank inverse.

Conventions as in :mod:`headwater.curvature.solvers` (vectors are rows, a ``matvec``
callable, never a model; Krylov bases and small factorisations in float64; local
seeded randomness; diagnostics returned, errors naming the setting).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from headwater.curvature._solver_common import (
    BREAKDOWN_TOL,
    DGKS,
    MatVec,
    apply,
    check_batch,
    check_int,
    check_real,
    resolve,
    start_vector,
)

__all__ = [
    "ArnoldiInfo",
    "LanczosInfo",
    "StopRule",
    "arnoldi",
    "lanczos",
    "lowrank_solve",
    "nystrom",
    "nystrom_preconditioner",
]


# ----------------------------------------------------------------------------- diagnostics


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


@dataclass(frozen=True)
class StopRule:
    """An early end of a Krylov run: after each of ``steps`` steps, stop when
    ``rule(ritz_values)`` (float64, descending) is true. ``rule`` sees every Ritz value of
    the steps so far (one small symmetric eigensolve per check)."""

    steps: tuple[int, ...]
    rule: Callable[[Tensor], bool]


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
    stop: StopRule | None = None,
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
        stop: ``(steps, rule)``: after each of these step counts, ``rule(ritz_values)``
            (float64, descending) may end the run there (:class:`StopRule`).

    Returns:
        ``eigvals [k]`` sorted descending, ``eigvecs [k, P]`` (rows, ``dtype``) and a
        :class:`LanczosInfo`, with ``k`` the number of steps taken (``n_iter``
        unless the run broke down).

    Raises:
        ValueError: On a bad argument.
        RuntimeError: If ``matvec`` returns NaN/inf.
    """
    dim, dtype, device = resolve(dim, dtype, device)
    n_iter = _check_n_iter(n_iter, dim)
    tol = check_real("tol", tol, 0.0)
    basis = torch.zeros(n_iter, dim, dtype=torch.float64, device=device)  # [m, P]
    alphas: list[float] = []
    betas: list[float] = []
    q = start_vector(dim, seed, device)
    norm_est = 0.0
    breakdown = False
    for j in range(n_iter):
        basis[j] = q
        w = apply(matvec, q.to(dtype)[None], f"Lanczos step {j}")[0].double()
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
            if w.norm() > DGKS * before:
                break
        alphas.append(alpha)
        betas.append(w.norm().item())
        if betas[-1] <= BREAKDOWN_TOL * norm_est:
            breakdown = True
            break
        if stop is not None and j + 1 in stop.steps and stop.rule(_tridiagonal_ritz(alphas, betas)):
            break
        q = w / betas[-1]
    m = len(alphas)
    theta, S = torch.linalg.eigh(_tridiagonal(alphas, betas))
    order = torch.argsort(theta, descending=True)
    return _ritz(theta, S, order, basis[:m], betas[-1], breakdown, tol, dtype, LanczosInfo)


def _tridiagonal(alphas: list[float], betas: list[float]) -> Tensor:
    """``T_m`` ``[m, m]`` (float64) from the first ``m`` alphas and betas."""
    m = len(alphas)
    off = torch.tensor(betas[: m - 1], dtype=torch.float64)
    return torch.diag(torch.tensor(alphas, dtype=torch.float64)) + off.diag(1) + off.diag(-1)


def _tridiagonal_ritz(alphas: list[float], betas: list[float]) -> Tensor:
    return torch.linalg.eigvalsh(_tridiagonal(alphas, betas)).flip(0)


def _check_n_iter(n_iter: object, dim: int) -> int:
    n_iter = check_int("n_iter", n_iter, 1)
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
    stop: StopRule | None = None,
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
        stop: as for :func:`lanczos` (the Ritz values of the symmetrised ``H``).

    Returns:
        ``eigvals [k]`` sorted by ``|lambda|`` descending, ``eigvecs [k, P]`` (rows,
        ``dtype``) and an :class:`ArnoldiInfo`; ``k = top_k`` unless the run broke
        down after fewer steps (then ``k`` is that number of steps).

    Raises:
        ValueError: On a bad argument.
        RuntimeError: If ``matvec`` returns NaN/inf.
    """
    dim, dtype, device = resolve(dim, dtype, device)
    n_iter = _check_n_iter(n_iter, dim)
    top_k = check_int("top_k", top_k, 1)
    if top_k > n_iter:
        raise ValueError(f"`top_k` must be <= n_iter = {n_iter}, got {top_k}")
    tol = check_real("tol", tol, 0.0)
    basis = torch.zeros(n_iter, dim, dtype=torch.float64, device=device)  # [m, P]
    H = torch.zeros(n_iter + 1, n_iter, dtype=torch.float64)  # upper Hessenberg
    v = start_vector(dim, seed, device)
    norm_est = 0.0
    breakdown = False
    m = 0
    for i in range(n_iter):
        basis[i] = v
        w = apply(matvec, v.to(dtype)[None], f"Arnoldi step {i}")[0].double()
        norm_est = max(norm_est, w.norm().item())
        for _ in range(2):  # Gram-Schmidt, twice (classical, vectorised: CGS2)
            h = basis[: i + 1] @ w  # [i+1]
            w = w - h @ basis[: i + 1]
            H[: i + 1, i] += h.cpu()
        H[i + 1, i] = w.norm().item()
        m = i + 1
        if H[i + 1, i].item() <= BREAKDOWN_TOL * norm_est:
            breakdown = True
            break
        if stop is not None and m in stop.steps and stop.rule(_hessenberg_ritz(H[:m, :m])):
            break
        v = w / H[i + 1, i].item()
    H_square = H[:m, :m]
    theta, S = torch.linalg.eigh((H_square + H_square.T) / 2)
    order = torch.argsort(theta.abs(), descending=True)[:top_k]
    last = H[m, m - 1].item()
    return _ritz(theta, S, order, basis[:m], last, breakdown, tol, dtype, ArnoldiInfo)


def _hessenberg_ritz(H_square: Tensor) -> Tensor:
    return torch.linalg.eigvalsh((H_square + H_square.T) / 2).flip(0)


# ----------------------------------------------------------------------------- Nyström


def nystrom(
    matvec: MatVec,
    dim: int,
    *,
    rank: int,
    seed: int = 0,
    oversample: int = 10,
    power_iters: int = 0,
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
    top ``rank`` pairs are returned. Exact when ``l = P`` (``rank = P``). With
    ``power_iters = q``, ``Omega`` is first replaced ``q`` times by the orthonormalised
    ``A Omega`` (subspace iteration; Halko, Martinsson & Tropp 2011, Algorithm 4.3): the
    sketch then spans ``A^q`` of the Gaussian one, whose top eigenvectors converge like
    ``(lambda_j / lambda_l)^q``, for ``q`` more products. Tropp,
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
        power_iters: Subspace iterations before the sketch (``>= 0``); each is one more
            call of ``matvec`` with ``l`` rows.
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
    dim, dtype, device = resolve(dim, dtype, device)
    rank = check_int("rank", rank, 1)
    if rank > dim:
        raise ValueError(f"`rank` must be <= dim = {dim}, got {rank}")
    oversample = check_int("oversample", oversample, 0)
    power_iters = check_int("power_iters", power_iters, 0)
    sketch = min(rank + oversample, dim)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    gaussian = torch.randn(dim, sketch, generator=generator, dtype=torch.float64)
    omega = torch.linalg.qr(gaussian).Q.T.contiguous().to(device)  # [l, P], orthonormal rows
    for i in range(power_iters):  # subspace iteration: Omega <- orth(A Omega)
        Y = apply(matvec, omega.to(dtype), f"Nystrom power iteration {i}").double()
        omega = torch.linalg.qr(Y.T).Q.T.contiguous()
    Y = apply(matvec, omega.to(dtype), "Nystrom sketch").double()  # [l, P]
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
    damping = check_real("damping", damping, 0.0)
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
    V = check_batch("V", V, dim=eigvecs.shape[1])
    damping = check_real("damping", damping, 0.0)
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
