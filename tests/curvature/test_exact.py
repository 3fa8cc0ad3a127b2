"""Exact curvature equals dense autograd references; solve/matvec/eigen; store round trip."""

import pytest
import torch
from cases import CASES
from oracles import assert_close, dense_ef, dense_ggn, dense_hessian

from headwater.curvature import Exact, dense_curvature
from headwater.curvature.defaults import DEFAULT_RELATIVE_DAMPING
from headwater.store import StoreMismatchError

ORACLES = {"hessian": dense_hessian, "ggn": dense_ggn, "ef": dense_ef}


@pytest.mark.parametrize("name", ["mlp", "cnn", "linreg"])
@pytest.mark.parametrize("kind", ["hessian", "ggn", "ef"])
def test_dense_matches_autograd(name, kind):
    case = CASES[name]()
    got = dense_curvature(case.model, case.task, case.train, kind, chunk_size=7)
    want = ORACLES[kind](case.model, case.task, case.train)
    assert_close(got, want, rtol=1e-6, atol=1e-9, what=f"{name} {kind}")


def test_ggn_equals_hessian_for_linear_model():
    case = CASES["linreg"]()
    assert_close(
        dense_curvature(case.model, case.task, case.train, "ggn"),
        dense_hessian(case.model, case.task, case.train),
        what="linear GGN vs Hessian",
    )


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_solve_and_matvec(kind):
    case = CASES["mlp"]()
    damping = 1.0  # above |smallest Hessian eigenvalue| (~0.5) so the damped matrix is definite
    curv = Exact(kind=kind, damping=damping).fit(case.model, case.task, case.train)
    dense = ORACLES[kind](case.model, case.task, case.train) + damping * torch.eye(
        51, dtype=torch.float64
    )
    v = torch.randn(4, 51, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert_close(curv.solve(v), torch.linalg.solve(dense, v.T).T, what="solve")
    assert_close(curv.matvec(v), v @ dense, what="matvec")
    assert_close(curv.matvec(curv.solve(v)), v, what="matvec(solve(v))")
    assert curv.solve(v[0]).shape == (51,)
    vals, vecs = curv.eigen()
    assert_close(
        vals,
        torch.linalg.eigvalsh(dense - damping * torch.eye(51, dtype=torch.float64)).flip(0),
        atol=1e-9,
        what="eigenvalues",
    )
    assert vecs.shape == (51, 51)


def test_default_damping_is_relative_to_mean_eigenvalue():
    case = CASES["mlp"]()
    curv = Exact().fit(case.model, case.task, case.train)
    mean_eig = torch.linalg.eigvalsh(dense_ggn(case.model, case.task, case.train)).mean().item()
    assert curv.fitted_damping == pytest.approx(DEFAULT_RELATIVE_DAMPING * mean_eig, rel=1e-9)


def test_indefinite_undamped_warns():
    case = CASES["mlp"]()
    case.task.weight_decay = 0.0
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        Exact(kind="hessian", damping=0.0).fit(case.model, case.task, case.train)


def test_too_many_parameters_names_alternatives():
    case = CASES["mlp"]()
    with pytest.raises(ValueError, match=r"max_params=.*ekfac.*cg"):
        Exact(max_params=50).fit(case.model, case.task, case.train)


def test_save_load_round_trip_and_mismatch(tmp_path):
    case = CASES["cnn"]()
    curv = Exact(damping=0.05).fit(case.model, case.task, case.train)
    curv.save(tmp_path / "exact")
    loaded = Exact(damping=0.05).load(tmp_path / "exact")
    v = torch.randn(3, curv.layout.num_params, dtype=torch.float64)
    assert torch.equal(loaded.solve(v), curv.solve(v))
    with pytest.raises(StoreMismatchError, match="damping"):
        Exact(damping=0.5).load(tmp_path / "exact")
    with pytest.raises(FileNotFoundError, match="store"):
        Exact(damping=0.05).load(tmp_path / "missing")


@pytest.mark.parametrize("damping", [0.3, None])
def test_cholesky_solver_equals_the_dense_solve(damping, tmp_path):
    case = CASES["cnn"]()
    curv = Exact(damping=damping, solver="cholesky").fit(case.model, case.task, case.train)
    dense = dense_ggn(case.model, case.task, case.train)
    lam = (
        damping
        if damping is not None
        else DEFAULT_RELATIVE_DAMPING * float(dense.diagonal().mean())
    )
    assert curv.fitted_damping == pytest.approx(lam, rel=1e-12)
    same = Exact(damping=damping).fit(case.model, case.task, case.train)  # eigh: same default
    assert curv.fitted_damping == pytest.approx(same.fitted_damping, rel=1e-12)
    damped = dense + lam * torch.eye(77, dtype=torch.float64)
    v = torch.randn(3, 77, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert_close(curv.solve(v), torch.linalg.solve(damped, v.T).T, rtol=1e-8, what="solve")
    assert_close(curv.matvec(v), v @ damped, rtol=1e-9, what="matvec")
    with pytest.raises(NotImplementedError, match="cholesky"):
        curv.eigen()
    curv.save(tmp_path / "c")
    assert_close(
        Exact(damping=damping, solver="cholesky").load(tmp_path / "c").solve(v), curv.solve(v)
    )
    with pytest.raises(ValueError, match="solver"):
        Exact(solver="lu")
