"""Tests of the matrix-free solvers in ``headwater.curvature.solvers`` on dense matrices."""

import itertools
import re
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from headwater.curvature.solvers import (
    arnoldi,
    conjugate_gradient,
    lanczos,
    lissa,
    lowrank_solve,
    nystrom,
    nystrom_preconditioner,
)

DT = torch.float64


def _sym(eigvals: Tensor | list[float], seed: int) -> Tensor:
    """A dense symmetric matrix ``Q diag(eigvals) Q^T`` with a seeded random ``Q``."""
    eigvals = torch.as_tensor(eigvals, dtype=DT)
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigvals), len(eigvals), generator=g, dtype=DT))
    return (q * eigvals) @ q.T


def _mv(A: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda V: V @ A  # rows: (A v)^T = v^T A for symmetric A


def _rhs(k: int, p: int, seed: int = 1) -> Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _rel(x: Tensor, y: Tensor) -> float:
    return ((x - y).norm() / y.norm()).item()


def _dense_solve(A: Tensor, B: Tensor, damping: float) -> Tensor:
    return torch.linalg.solve(A + damping * torch.eye(A.shape[0], dtype=DT), B.T).T


SPD = _sym(torch.logspace(-1, 1, 40, dtype=DT), seed=0)  # eigenvalues 0.1 .. 10
# Ill-conditioned: 8 large eigenvalues 1e1..1e4 on top of a bulk in [1e-2, 1].
ILL = _sym(torch.cat([torch.logspace(1, 4, 8), torch.logspace(-2, 0, 52)]), seed=2)
# Well separated top eigenvalues over a bulk in [0, 1].
SEPARATED = _sym(torch.cat([torch.tensor([100.0, 50.0, 25.0]), torch.linspace(0, 1, 47)]), 3)
# Indefinite, with the largest |lambda| negative.
# (The bulk has no |lambda| ties, so the top-k by |lambda| is unique.)
INDEFINITE = _sym(torch.cat([torch.tensor([-80.0, 60.0]), torch.linspace(-4.9, 5.3, 38)]), 4)
# Geometrically decaying PSD spectrum.
DECAYING = _sym(10.0 * 0.8 ** torch.arange(50, dtype=DT), seed=5)


# ----------------------------------------------------------------------------- CG


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_cg_matches_dense_solve(damping: float) -> None:
    B = _rhs(3, 40)
    X, info = conjugate_gradient(_mv(SPD), B, damping=damping, tol=1e-10)
    assert info.converged and bool(info.converged_rows.all())
    assert info.residuals.max() <= 1e-10
    assert _rel(X, _dense_solve(SPD, B, damping)) < 1e-6
    assert X.dtype == B.dtype and X.shape == B.shape


def test_cg_preconditioned_matches_and_needs_fewer_iterations() -> None:
    damping = 1e-2
    B = _rhs(2, 60)
    expected = _dense_solve(ILL, B, damping)
    X_plain, plain = conjugate_gradient(_mv(ILL), B, damping=damping, tol=1e-10)
    eigvals, eigvecs = nystrom(_mv(ILL), 60, rank=8, oversample=10, dtype=DT)
    precond = nystrom_preconditioner(eigvals, eigvecs, damping)
    X_pre, pre = conjugate_gradient(_mv(ILL), B, damping=damping, tol=1e-10, preconditioner=precond)
    assert plain.converged and pre.converged
    assert _rel(X_plain, expected) < 1e-6 and _rel(X_pre, expected) < 1e-6
    assert pre.iterations < 0.6 * plain.iterations


def test_cg_jacobi_preconditioner() -> None:
    d = torch.logspace(-2, 2, 30, dtype=DT)
    A = d.sqrt()[:, None] * _sym(torch.linspace(0.5, 2, 30), seed=6) * d.sqrt()[None, :]
    B = _rhs(2, 30)
    X, info = conjugate_gradient(_mv(A), B, tol=1e-12, preconditioner=lambda R: R / A.diag())
    assert info.converged
    assert _rel(X, _dense_solve(A, B, 0.0)) < 1e-6


def test_cg_rows_converge_independently() -> None:
    _, eigvecs = torch.linalg.eigh(SPD)
    B = torch.stack([eigvecs[:, 0], torch.zeros(40, dtype=DT), _rhs(1, 40)[0]])
    seen: list[int] = []

    def mv(V: Tensor) -> Tensor:
        seen.append(V.shape[0])
        return V @ SPD

    X, info = conjugate_gradient(mv, B, tol=1e-10)
    assert info.iterations_per_row.tolist()[:2] == [1, 0]  # eigenvector: one step; zero: none
    assert info.iterations_per_row[2] > 1
    assert seen[0] == 2 and seen[-1] == 1  # later calls only get the running rows
    assert torch.equal(X[1], torch.zeros(40, dtype=DT))
    assert _rel(X, _dense_solve(SPD, B, 0.0)) < 1e-6


def test_cg_warm_start_and_max_iter() -> None:
    B = _rhs(2, 40)
    exact = _dense_solve(SPD, B, 0.0)
    _, info = conjugate_gradient(_mv(SPD), B, x0=exact, tol=1e-8)
    assert info.iterations == 0 and info.converged
    _, info = conjugate_gradient(_mv(ILL), _rhs(2, 60), max_iter=3)
    assert info.iterations == 3 and not info.converged


def test_cg_float32_follows_input() -> None:
    B = _rhs(2, 40).float()
    X, info = conjugate_gradient(lambda V: V @ SPD.float(), B, tol=1e-5)
    assert X.dtype == torch.float32 and info.converged
    assert _rel(X.double(), _dense_solve(SPD, B.double(), 0.0)) < 1e-4


def test_cg_indefinite_and_nan_raise() -> None:
    with pytest.raises(ValueError, match="`damping`"):
        conjugate_gradient(_mv(INDEFINITE), _rhs(2, 40))
    with pytest.raises(RuntimeError, match="NaN"):
        conjugate_gradient(lambda V: V * float("nan"), _rhs(2, 40))


# ----------------------------------------------------------------------------- LiSSA


def test_lissa_converges_to_dense_solve() -> None:
    B = _rhs(3, 40)
    X, info = lissa(lambda V, step: V @ SPD, B, depth=400, scale=12.0, damping=0.1)
    assert _rel(X, _dense_solve(SPD, B, 0.1)) < 5e-2
    assert info.steps == 400 and not info.norms.isnan().any()  # tol 0: every step runs
    assert X.dtype == B.dtype


def test_lissa_stops_each_row_at_tol_with_an_honest_residual() -> None:
    eigvecs = torch.linalg.eigh(SPD).eigenvectors
    # a top eigenvector contracts by 1 - 10.1/12 per step, a bottom one by 1 - 0.2/12
    B = torch.stack([eigvecs[:, -1], eigvecs[:, 0], _rhs(1, 40)[0]])
    rows: list[int] = []
    reported: list[tuple[int, float]] = []

    def mv(V: Tensor, step: int) -> Tensor:
        rows.append(V.shape[0])
        return V @ SPD

    def callback(step: int, residuals: Tensor) -> None:
        reported.append((step, float(residuals.max())))

    X, info = lissa(mv, B, depth=2000, scale=12.0, damping=0.1, tol=1e-6, callback=callback)
    assert info.converged and info.residual <= 1e-6
    # the top eigenvector stops within a few steps, the others later, one at a time
    assert rows[:3] == [3, 3, 3] and rows[20] == 2 and rows[-1] == 1 and rows == sorted(rows)[::-1]
    assert len(rows) == info.steps < 2000
    assert [s for s, _ in reported] == list(range(1, info.steps + 1))
    assert reported[-1][1] == info.residual
    assert (
        info.norms[0, info.steps :].isnan().all() and not info.norms[0, : info.steps].isnan().any()
    )
    true = ((B - X @ SPD - 0.1 * X).norm(dim=1) / B.norm(dim=1)).max().item()
    assert true <= 1e-6  # the returned estimate is a step past the measured residual
    assert _rel(X, _dense_solve(SPD, B, 0.1)) < 1e-5
    _, short = lissa(mv, B, depth=5, scale=12.0, damping=0.1, tol=1e-6)
    assert not short.converged and short.steps == 5 and short.residual > 1e-3


def test_lissa_stochastic_steps_and_repeats() -> None:
    noise = _sym(torch.linspace(-0.5, 0.5, 40), seed=7)
    batches = [SPD + noise, SPD - noise]  # mean is SPD
    steps: list[int] = []

    def mv(V: Tensor, step: int) -> Tensor:
        steps.append(step)
        return V @ batches[step % 2]

    B = _rhs(2, 40)
    X, info = lissa(mv, B, depth=300, repeats=3, scale=15.0, damping=0.5)
    assert steps == list(range(900))
    assert info.norms.shape == (3, 300)
    assert _rel(X, _dense_solve(SPD, B, 0.5)) < 5e-2


def test_lissa_diverges_with_small_scale() -> None:
    with pytest.raises(RuntimeError, match="`scale`") as err:
        lissa(lambda V, step: V @ SPD, _rhs(2, 40), depth=200, scale=2.0)
    estimate = float(re.search(r"\(~([0-9.e+-]+)\)", str(err.value)).group(1))
    assert estimate == pytest.approx(10.0, rel=0.05)  # the top eigenvalue
    with pytest.raises(RuntimeError, match="`damping`"):
        lissa(lambda V, step: V @ INDEFINITE, _rhs(2, 40), depth=500, scale=200.0)


# ----------------------------------------------------------------------------- Lanczos / Arnoldi


@pytest.mark.parametrize("A", [SPD, INDEFINITE], ids=["spd", "indefinite"])
def test_lanczos_full_iterations_exact(A: Tensor) -> None:
    calls: list[tuple[int, ...]] = []

    def mv(V: Tensor) -> Tensor:
        calls.append(tuple(V.shape))
        return V @ A

    eigvals, eigvecs, info = lanczos(mv, 40, n_iter=40, dtype=DT)
    expected = torch.linalg.eigvalsh(A).flip(0)
    assert set(calls) == {(1, 40)}
    assert torch.all(eigvals[:-1] >= eigvals[1:])
    assert _rel(eigvals, expected) < 1e-6
    assert (eigvecs @ A - eigvals[:, None] * eigvecs).norm(dim=1).max() < 1e-6 * A.norm()
    assert torch.allclose(eigvecs @ eigvecs.T, torch.eye(40, dtype=DT), atol=1e-8)
    assert info.iterations == 40


def test_lanczos_few_iterations_top_eigenvalues() -> None:
    eigvals, eigvecs, info = lanczos(_mv(SEPARATED), 50, n_iter=20, dtype=DT)
    assert eigvals.shape == (20,) and eigvecs.shape == (20, 50)
    assert _rel(eigvals[:3], torch.tensor([100.0, 50.0, 25.0], dtype=DT)) < 1e-6
    assert bool(info.converged[:3].all())


def test_lanczos_breakdown_on_low_rank() -> None:
    A = _sym(torch.cat([torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0]), torch.zeros(35)]), seed=8)
    eigvals, _, info = lanczos(_mv(A), 40, n_iter=20, dtype=DT)
    assert info.breakdown and info.iterations <= 6
    assert _rel(eigvals[:5], torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=DT)) < 1e-8


@pytest.mark.parametrize("A", [SPD, INDEFINITE], ids=["spd", "indefinite"])
def test_arnoldi_full_iterations_exact(A: Tensor) -> None:
    eigvals, eigvecs, info = arnoldi(_mv(A), 40, n_iter=40, top_k=10, dtype=DT)
    full = torch.linalg.eigvalsh(A)
    expected = full[torch.argsort(full.abs(), descending=True)][:10]
    assert _rel(eigvals, expected) < 1e-6
    assert torch.all(eigvals.abs()[:-1] >= eigvals.abs()[1:])
    assert (eigvecs @ A - eigvals[:, None] * eigvecs).norm(dim=1).max() < 1e-6 * A.norm()
    assert info.iterations == 40 and eigvecs.shape == (10, 40)
    if A is INDEFINITE:
        assert eigvals[0].item() == pytest.approx(-80.0)


def test_arnoldi_few_iterations_top_eigenvalues() -> None:
    eigvals, _, info = arnoldi(_mv(SEPARATED), 50, n_iter=20, top_k=3, dtype=DT)
    assert _rel(eigvals, torch.tensor([100.0, 50.0, 25.0], dtype=DT)) < 1e-6
    assert bool(info.converged.all()) and info.ritz_residuals.shape == (3,)


# ----------------------------------------------------------------------------- low rank


@pytest.mark.parametrize("residual", [False, True])
def test_full_rank_lowrank_solve_is_exact(residual: bool) -> None:
    damping = 0.05
    B = _rhs(3, 50)
    expected = _dense_solve(DECAYING, B, damping)
    l_arn, u_arn, _ = arnoldi(_mv(DECAYING), 50, n_iter=50, top_k=50, dtype=DT)
    l_nys, u_nys = nystrom(_mv(DECAYING), 50, rank=50, dtype=DT)
    for eigvals, eigvecs in [(l_arn, u_arn), (l_nys, u_nys)]:
        X = lowrank_solve(eigvals, eigvecs, B, damping=damping, residual=residual)
        assert _rel(X, expected) < 1e-6


def test_nystrom_full_rank_reconstructs() -> None:
    eigvals, eigvecs = nystrom(_mv(DECAYING), 50, rank=50, dtype=DT)
    assert torch.all(eigvals[:-1] >= eigvals[1:]) and torch.all(eigvals >= 0)
    assert _rel((eigvecs.T * eigvals) @ eigvecs, DECAYING) < 1e-6
    precond = nystrom_preconditioner(eigvals, eigvecs, 0.1)
    # At full rank P^{-1} = (lambda_min + mu) (A + mu I)^{-1}.
    B = _rhs(2, 50)
    scale = eigvals.min() + 0.1
    assert _rel(precond(B), scale * _dense_solve(DECAYING, B, 0.1)) < 1e-6


@pytest.mark.parametrize("method", ["arnoldi", "nystrom"])
def test_residual_lowrank_error_falls_with_rank(method: str) -> None:
    damping = 0.01
    B = _rhs(3, 50)
    expected = _dense_solve(DECAYING, B, damping)
    errors = []
    for rank in [5, 15, 30, 45]:
        if method == "arnoldi":
            eigvals, eigvecs, _ = arnoldi(_mv(DECAYING), 50, n_iter=50, top_k=rank, dtype=DT)
        else:
            eigvals, eigvecs = nystrom(_mv(DECAYING), 50, rank=rank, dtype=DT)
        X = lowrank_solve(eigvals, eigvecs, B, damping=damping, residual=True)
        errors.append(_rel(X, expected))
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[-1] < errors[0] / 10, errors


def test_truncated_lowrank_ignores_discarded_directions() -> None:
    eigvals, eigvecs = torch.linalg.eigh(SPD)
    U = eigvecs.T[-5:]  # top 5 as rows
    outside = eigvecs.T[:3]  # orthogonal to U
    X = lowrank_solve(eigvals[-5:], U, outside, damping=0.1, residual=False)
    assert X.abs().max() < 1e-12
    X = lowrank_solve(eigvals[-5:], U, outside, damping=0.1, residual=True)
    assert _rel(X, outside / 0.1) < 1e-12


def test_nystrom_power_iterations_approach_the_top_eigenvalues() -> None:
    """A slowly decaying spectrum: the plain sketch's 10th eigenvalue is far below the true
    one; each subspace iteration brings all ten closer (true: the dense eigvalsh)."""
    spectrum = 1.0 / (1.0 + torch.arange(50, dtype=DT)) ** 0.5
    A = _sym(spectrum, seed=6)
    true = torch.linalg.eigvalsh(A).flip(0)[:10]
    calls = []

    def mv(V: Tensor) -> Tensor:
        calls.append(V.shape[0])
        return V @ A

    errors = []
    for q in (0, 1, 2):
        calls.clear()
        eigvals, eigvecs = nystrom(mv, 50, rank=10, oversample=2, power_iters=q, dtype=DT)
        assert calls == [12] * (q + 1)  # one batched product per iteration and the sketch
        assert torch.all(eigvals <= true + 1e-12)  # a Nyström approximation is below A
        errors.append(float(((true - eigvals) / true).max()))
        assert _rel(eigvecs @ eigvecs.T, torch.eye(10, dtype=DT)) < 1e-10
    assert errors[0] > 0.2 and errors[1] < 0.8 * errors[0] and errors[2] < 0.8 * errors[1], errors


def test_nystrom_rejects_indefinite() -> None:
    with pytest.raises(ValueError, match="positive semi-definite"):
        nystrom(_mv(INDEFINITE), 40, rank=40, dtype=DT)


# ----------------------------------------------------------------------------- determinism


def test_seeded_determinism_and_global_rng_untouched() -> None:
    state = torch.get_rng_state()
    a1 = lanczos(_mv(SEPARATED), 50, n_iter=10, seed=3, dtype=DT)
    a2 = lanczos(_mv(SEPARATED), 50, n_iter=10, seed=3, dtype=DT)
    b1 = arnoldi(_mv(SEPARATED), 50, n_iter=10, top_k=4, seed=3, dtype=DT)
    b2 = arnoldi(_mv(SEPARATED), 50, n_iter=10, top_k=4, seed=3, dtype=DT)
    c1 = nystrom(_mv(DECAYING), 50, rank=5, seed=3, dtype=DT)
    c2 = nystrom(_mv(DECAYING), 50, rank=5, seed=3, dtype=DT)
    lissa(lambda V, step: V @ SPD, _rhs(1, 40), depth=5, scale=12.0)
    conjugate_gradient(_mv(SPD), _rhs(1, 40))
    assert torch.equal(torch.get_rng_state(), state)
    for x, y in [(a1, a2), (b1, b2), (c1, c2)]:
        assert torch.equal(x[0], y[0]) and torch.equal(x[1], y[1])
    other = lanczos(_mv(SEPARATED), 50, n_iter=10, seed=4, dtype=DT)
    assert not torch.equal(other[1], a1[1])


def test_dtype_follows_request() -> None:
    seen: list[torch.dtype] = []

    def mv(V: Tensor) -> Tensor:
        seen.append(V.dtype)
        return V @ SPD.float()

    eigvals, eigvecs, _ = lanczos(mv, 40, n_iter=10, dtype=torch.float32)
    assert eigvecs.dtype == torch.float32 and eigvals.dtype == torch.float32
    eigvals, eigvecs, _ = arnoldi(mv, 40, n_iter=10, top_k=2, dtype=torch.float32)
    assert eigvecs.dtype == torch.float32
    eigvals, eigvecs = nystrom(mv, 40, rank=5, dtype=torch.float32)
    assert eigvecs.dtype == torch.float32
    assert set(seen) == {torch.float32}


# ----------------------------------------------------------------------------- bad arguments

_U = torch.linalg.qr(_rhs(3, 40).T).Q.T.contiguous()  # [3, 40] orthonormal rows
_L = torch.tensor([3.0, 2.0, 1.0], dtype=DT)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: conjugate_gradient(_mv(SPD), _rhs(1, 40)[0]), "B"),
        (lambda: conjugate_gradient(_mv(SPD), _rhs(1, 40), tol=-1.0), "tol"),
        (lambda: conjugate_gradient(_mv(SPD), _rhs(1, 40), damping=-0.1), "damping"),
        (lambda: conjugate_gradient(_mv(SPD), _rhs(1, 40), max_iter=0), "max_iter"),
        (lambda: conjugate_gradient(_mv(SPD), _rhs(1, 40), x0=_rhs(2, 40)), "x0"),
        (lambda: conjugate_gradient(lambda V: V[:, :3], _rhs(1, 40)), "matvec"),
        (lambda: lissa(lambda V, s: V, _rhs(1, 40), depth=0, scale=1.0), "depth"),
        (lambda: lissa(lambda V, s: V, _rhs(1, 40), depth=5, scale=0.0), "scale"),
        (lambda: lissa(lambda V, s: V, _rhs(1, 40), depth=5, scale=1.0, repeats=0), "repeats"),
        (lambda: lanczos(_mv(SPD), 40, n_iter=0), "n_iter"),
        (lambda: lanczos(_mv(SPD), 40, n_iter=41), "n_iter"),
        (lambda: lanczos(_mv(SPD), 0, n_iter=1), "dim"),
        (lambda: lanczos(_mv(SPD), 40, n_iter=5, dtype=torch.int64), "dtype"),
        (lambda: arnoldi(_mv(SPD), 40, n_iter=5, top_k=0), "top_k"),
        (lambda: arnoldi(_mv(SPD), 40, n_iter=5, top_k=6), "top_k"),
        (lambda: nystrom(_mv(SPD), 40, rank=0), "rank"),
        (lambda: nystrom(_mv(SPD), 40, rank=41), "rank"),
        (lambda: nystrom(_mv(SPD), 40, rank=4, oversample=-1), "oversample"),
        (lambda: lowrank_solve(_L, _U, _rhs(2, 40), damping=0.0, residual=True), "damping"),
        (lambda: lowrank_solve(_L, _U, _rhs(2, 30), damping=0.1, residual=False), "V"),
        (lambda: lowrank_solve(_L[:2], _U, _rhs(2, 40), damping=0.1, residual=False), "eigvecs"),
        (lambda: lowrank_solve(-_L, _U, _rhs(2, 40), damping=1.0, residual=False), "damping"),
        (lambda: nystrom_preconditioner(_L * 0, _U, 0.0), "damping"),
    ],
)
def test_bad_arguments_raise_naming_them(call: Callable[[], object], name: str) -> None:
    with pytest.raises(ValueError, match=f"`{name}`"):
        call()
