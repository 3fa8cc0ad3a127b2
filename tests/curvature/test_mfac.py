"""M-FAC: Woodbury solve equals the dense inverse; entries, OBS scores; stores; refusals."""

import pytest
import torch
from cases import CASES
from oracles import assert_close, dense_ef, loop_gradients

from headwater.curvature import CURVATURES, MFAC
from headwater.store import StoreMismatchError

F64 = torch.float64


def _v(k: int, p: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _window_matrix(case, m: int, damping: float) -> torch.Tensor:
    """damping·I + wd·I + (1/m) Σ_{i<m} g_i g_iᵀ, dense."""
    g = loop_gradients(case.model, case.task, (case.train[0][:m], case.train[1][:m]))
    eye = torch.eye(g.shape[1], dtype=F64)
    return (damping + case.task.weight_decay) * eye + g.T @ g / m


@pytest.mark.parametrize("name", ["mlp", "cnn", "linreg"])
def test_solve_equals_dense_inverse(name):
    case = CASES[name]()
    curv = MFAC(kind="ef", damping=0.05, chunk_size=7).fit(case.model, case.task, case.train)
    dense = dense_ef(case.model, case.task, case.train) + 0.05 * torch.eye(
        curv.layout.num_params, dtype=F64
    )
    v = _v(4, curv.layout.num_params)
    assert_close(curv.solve(v), torch.linalg.solve(dense, v.T).T, rtol=1e-8, what="solve")
    assert_close(curv.matvec(v), v @ dense, rtol=1e-8, what="matvec")
    assert_close(curv.solve(curv.matvec(v)), v, rtol=1e-8, what="solve(matvec(v))")


def test_window_and_blocks():
    case = CASES["mlp"]()
    full = _window_matrix(case, 10, 0.02)
    curv = MFAC(kind="ef", damping=0.02, n_grads=10).fit(case.model, case.task, case.train)
    v = _v(3, 51, 1)
    assert curv.window == 10
    assert_close(curv.solve(v), torch.linalg.solve(full, v.T).T, rtol=1e-8, what="window")
    blocked = MFAC(kind="ef", damping=0.02, n_grads=10, block_size=20).fit(
        case.model, case.task, case.train
    )
    mask = torch.zeros(51, 51, dtype=torch.bool)
    for s in range(0, 51, 20):
        mask[s : s + 20, s : s + 20] = True
    block_diag = full * mask
    assert_close(blocked.solve(v), torch.linalg.solve(block_diag, v.T).T, rtol=1e-8, what="blocks")
    assert_close(blocked.matvec(v), v @ block_diag, rtol=1e-8, what="block matvec")


@pytest.mark.parametrize("block_size", [None, 16])
def test_inverse_entries_and_obs(block_size):
    case = CASES["mlp"]()
    curv = MFAC(kind="ef", damping=0.1, block_size=block_size).fit(
        case.model, case.task, case.train
    )
    inv = curv.solve(torch.eye(51, dtype=F64))
    assert_close(curv.inverse_diagonal(), torch.diagonal(inv), rtol=1e-8, what="diagonal")
    for i, j in [(0, 0), (3, 7), (5, 40), (50, 2)]:
        assert curv.inverse_hessian_entry(i, j) == pytest.approx(
            float(inv[i, j]), rel=1e-8, abs=1e-12
        )
    theta = torch.cat([p.detach().reshape(-1) for p in case.model.parameters()])
    scores = curv.pruning_scores(theta)
    assert_close(scores, theta**2 / (2 * torch.diagonal(inv)), rtol=1e-8, what="OBS scores")
    j = int(scores.argmin())
    delta = curv.obs_update(theta, j)
    assert abs(float(theta[j] + delta[j])) < 1e-10
    assert_close(delta, -theta[j] * inv[:, j] / inv[j, j], rtol=1e-8, what="OBS update")
    with pytest.raises(ValueError, match="weights"):
        curv.pruning_scores(theta[:5])
    with pytest.raises(ValueError, match="j"):
        curv.inverse_hessian_entry(0, 51)


def test_sampled_targets_are_seeded_and_ggn_default():
    case = CASES["mlp"]()
    a = MFAC(damping=0.1, seed=4).fit(case.model, case.task, case.train)
    b = MFAC(damping=0.1, seed=4).fit(case.model, case.task, case.train)
    c = MFAC(damping=0.1, seed=5).fit(case.model, case.task, case.train)
    v = _v(2, 51)
    assert torch.equal(a.solve(v), b.solve(v))
    assert not torch.allclose(a.solve(v), c.solve(v))
    assert CURVATURES["mfac"] is MFAC


def test_save_load_and_refusal(tmp_path):
    case = CASES["cnn"]()
    curv = MFAC(kind="ef", damping=0.05, block_size=30).fit(case.model, case.task, case.train)
    curv.save(tmp_path / "mfac")
    back = MFAC(kind="ef", damping=0.05, block_size=30).load(tmp_path / "mfac")
    v = _v(3, 77)
    assert torch.equal(back.solve(v), curv.solve(v))
    with pytest.raises(StoreMismatchError, match="block_size"):
        MFAC(kind="ef", damping=0.05).load(tmp_path / "mfac")
    with pytest.raises(StoreMismatchError, match="kind"):
        MFAC(damping=0.05, block_size=30).load(tmp_path / "mfac")


def test_bad_arguments():
    case = CASES["linreg"]()
    case.task.weight_decay = 0.0
    with pytest.raises(ValueError, match="damping"):
        MFAC(kind="ef", damping=0.0).fit(case.model, case.task, case.train)
    with pytest.raises(ValueError, match="n_grads"):
        MFAC(n_grads=0)
    with pytest.raises(ValueError, match="kind"):
        MFAC(kind="hessian")
    default = MFAC(kind="ef").fit(case.model, case.task, case.train)
    assert default.fitted_damping > 0
