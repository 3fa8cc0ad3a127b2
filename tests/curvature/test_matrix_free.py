"""Matrix-free and low-rank curvatures (CG, LiSSA, Arnoldi, Lanczos, Nyström, Diagonal,
Identity) against Exact and the dense autograd oracles, in float64 on the tiny cases."""

import functools
import itertools
import warnings

import pytest
import torch
from cases import CASES
from oracles import (
    assert_close,
    dense_ef,
    dense_ggn,
    dense_hessian,
    influence_scores,
    loop_gradients,
)

import headwater
from headwater.curvature import (
    CG,
    CURVATURES,
    Arnoldi,
    Diagonal,
    Exact,
    Identity,
    Lanczos,
    LiSSA,
    Nystrom,
)
from headwater.curvature.lanczos import minibatch_spectrum
from headwater.methods import InfluenceFunction
from headwater.store import StoreMismatchError

DT = torch.float64
ORACLES = {"hessian": dense_hessian, "ggn": dense_ggn, "ef": dense_ef}


def _rhs(k: int, p: int, seed: int = 3) -> torch.Tensor:
    return torch.randn(k, p, generator=torch.Generator().manual_seed(seed), dtype=DT)


def _rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x - y).norm() / y.norm()).item()


def _dense(case, kind: str, damping: float) -> torch.Tensor:
    m = ORACLES[kind](case.model, case.task, case.train)
    return m + damping * torch.eye(m.shape[0], dtype=DT)


# ----------------------------------------------------------------------------- CG, LiSSA


@pytest.mark.parametrize(
    ("name", "kind", "damping"),
    [
        ("mlp", "ggn", 1e-2),
        ("mlp", "hessian", 1.0),
        ("cnn", "ggn", 1e-2),
        ("linreg", "ggn", 0.0),
        ("mlp", "ef", 0.01),
    ],
)
def test_cg_solve_matches_dense(name, kind, damping):
    case = CASES[name]()
    curv = CG(kind=kind, damping=damping, tol=1e-12).fit(case.model, case.task, case.train)
    dense = _dense(case, kind, damping)
    v = _rhs(4, dense.shape[0])
    assert _rel(curv.solve(v), torch.linalg.solve(dense, v.T).T) < 1e-6
    assert curv.last_info.converged and curv.last_info.residuals.shape == (4,)
    assert_close(curv.matvec(v), v @ dense, what="CG matvec")
    assert curv.solve(v[0]).shape == (dense.shape[0],)


def test_cg_preconditioner_same_answer_fewer_iterations():
    case = CASES["cnn"]()
    v = _rhs(3, 77)
    plain = CG(damping=1e-4, tol=1e-10, preconditioner="none").fit(
        case.model, case.task, case.train
    )
    pre = CG(damping=1e-4, tol=1e-10, preconditioner_rank=30).fit(case.model, case.task, case.train)
    x_plain, x_pre = plain.solve(v), pre.solve(v)
    assert _rel(x_pre, x_plain) < 1e-6
    assert pre.last_info.iterations < plain.last_info.iterations
    auto = CG(damping=1e-4, tol=1e-10).fit(case.model, case.task, case.train)  # rank min(100, P)
    assert auto.state.precond_eigvals.numel() == 77 and auto.settings()["preconditioner"] == "auto"
    assert_close(auto.solve(v), x_plain, rtol=1e-6)
    assert auto.last_info.iterations <= 2 and auto.fit_notes["cg_preconditioner"].startswith("nys")


def test_cg_drops_a_preconditioner_that_slows_it():
    """The first solve compares a few iterations with and without the preconditioner: an
    ill-conditioned (but positive definite) one is dropped, the exact inverse is kept."""
    case = CASES["mlp"]()
    v = _rhs(6, 51)
    dense = _dense(case, "ggn", 1e-3)
    scales = torch.logspace(-3, 3, 51, dtype=DT)
    bad, good = (lambda r: r * scales), (lambda r: torch.linalg.solve(dense, r.T).T)
    plain = CG(damping=1e-3, tol=1e-10, preconditioner="none").fit(
        case.model, case.task, case.train
    )
    want = plain.solve(v)
    for precond, kept in ((bad, False), (good, True)):
        curv = CG(damping=1e-3, tol=1e-10, preconditioner="diagonal").fit(
            case.model, case.task, case.train
        )
        curv._precondition = precond
        assert_close(curv.solve(v), want, rtol=1e-6)
        assert curv.fit_notes["cg_preconditioner"].startswith("diagonal" if kept else "none")
        if kept:
            assert curv.last_info.iterations == 1
        else:
            assert curv.last_info.iterations == plain.last_info.iterations
    unchecked = CG(
        damping=1e-3, tol=1e-10, preconditioner="diagonal", check_preconditioner=False
    ).fit(case.model, case.task, case.train)
    unchecked._precondition = bad
    unchecked.solve(v)
    assert unchecked.last_info.iterations > plain.last_info.iterations


@pytest.mark.parametrize(
    ("preconditioner", "iterations"), [("ekfac", 1), ("kfac", 1), ("diagonal", 7)]
)
def test_cg_fitted_preconditioner(preconditioner, iterations):
    # linear regression: K-FAC/EK-FAC are the exact GGN, so preconditioned CG stops after one step
    case = CASES["linreg"]()
    v = _rhs(3, 12)
    pre = CG(damping=1e-3, tol=1e-10, preconditioner=preconditioner).fit(
        case.model, case.task, case.train
    )
    assert _rel(pre.solve(v), torch.linalg.solve(_dense(case, "ggn", 1e-3), v.T).T) < 1e-6
    assert pre.last_info.iterations <= iterations
    mlp = CASES["mlp"]()  # and the right answer where they are only approximations
    pre = CG(damping=1e-3, tol=1e-10, preconditioner=preconditioner).fit(
        mlp.model, mlp.task, mlp.train
    )
    v = _rhs(3, 51)
    assert _rel(pre.solve(v), torch.linalg.solve(_dense(mlp, "ggn", 1e-3), v.T).T) < 1e-6
    with pytest.raises(ValueError, match="preconditioner"):
        CG(preconditioner="ekfac", preconditioner_rank=4)
    with pytest.raises(ValueError, match="preconditioner"):
        CG(preconditioner="cholesky")


def test_lissa_preconditioned(tmp_path):
    # linear regression: EK-FAC is the exact GGN, so a few preconditioned steps are exact
    case = CASES["linreg"]()
    v = _rhs(3, 12)
    want = torch.linalg.solve(_dense(case, "ggn", 1e-3), v.T).T
    curv = LiSSA(damping=1e-3, depth=10, tol=1e-9, preconditioner="ekfac").fit(
        case.model, case.task, case.train
    )
    plain = LiSSA(damping=1e-3, depth=10, tol=1e-9, preconditioner="none").fit(
        case.model, case.task, case.train
    )
    assert _rel(curv.solve(v), want) < 1e-6 and curv.last_info.converged
    with pytest.warns(RuntimeWarning, match=r"did not reach tol=1e-09 in depth=10 steps"):
        assert _rel(plain.solve(v), want) > 1e-2
    with warnings.catch_warnings():  # a deliberate budget: tol 0 (every step) or warn=False
        warnings.simplefilter("error")
        for kw in ({"tol": 0.0}, {"tol": 1e-9, "warn": False}):
            budget = LiSSA(damping=1e-3, depth=10, preconditioner="none", **kw)
            budget.fit(case.model, case.task, case.train).solve(v)
            assert budget.last_info.steps == 10 and not budget.last_info.converged
    # the default tol (1e-2) stops at the first step whose residual is below it
    curv = LiSSA(damping=1e-3, preconditioner="ekfac").fit(case.model, case.task, case.train)
    x = curv.solve(v)
    assert curv.last_info.converged and curv.last_info.steps < 5 and _rel(x, want) < 1e-2
    case = CASES["mlp"]()  # an approximate preconditioner: converges to the same answer
    v = _rhs(3, 51)
    want = torch.linalg.solve(_dense(case, "ggn", 0.1), v.T).T
    curv = LiSSA(damping=0.1, depth=300, preconditioner="diagonal").fit(
        case.model, case.task, case.train
    )
    assert _rel(curv.solve(v), want) < 5e-2
    curv.save(tmp_path / "lissa")
    loaded = LiSSA(damping=0.1, depth=300, preconditioner="diagonal").load(tmp_path / "lissa")
    got = loaded.bind(case.model, case.task, case.train).solve(v)
    assert_close(got, curv.solve(v), rtol=1e-10)
    # the default: a Nyström sketch (part of the saved state) takes far fewer steps than
    # EK-FAC to the same tolerance
    kw = {"damping": 0.1, "tol": 1e-6, "depth": 2000}
    sketch = LiSSA(preconditioner_rank=10, **kw).fit(case.model, case.task, case.train)
    ekfac = LiSSA(preconditioner="ekfac", **kw).fit(case.model, case.task, case.train)
    assert sketch._fitted_preconditioner().value == "nystrom"
    assert sketch.state.precond_eigvecs.shape == (10, 51)
    assert _rel(sketch.solve(v), want) < 1e-5 and _rel(ekfac.solve(v), want) < 1e-5
    assert sketch.last_info.steps < ekfac.last_info.steps / 2, (
        sketch.last_info.steps,
        ekfac.last_info.steps,
    )
    sketch.save(tmp_path / "sketch")
    loaded = LiSSA(preconditioner_rank=10, **kw).load(tmp_path / "sketch")
    assert_close(loaded.state.precond_eigvecs, sketch.state.precond_eigvecs, rtol=0)
    got = loaded.bind(case.model, case.task, case.train).solve(v)
    assert_close(got, sketch.solve(v), rtol=1e-10)
    assert (
        LiSSA(kind="hessian", damping=1.0)
        .fit(case.model, case.task, case.train)
        ._fitted_preconditioner()
        .value
        == "ekfac"
    )  # a sketch needs a PSD matrix
    with pytest.raises(ValueError, match="preconditioner_rank"):
        LiSSA(kind="hessian", preconditioner="nystrom")


@pytest.mark.parametrize("kind", ["ggn", "hessian", "ef"])
def test_cached_products_equal_uncached(kind):
    """Every way of computing a product (stored Jacobians, cached or rebuilt autograd
    linearisations) equals the dense oracle's, on repeated calls and on one vector."""
    case = CASES["cnn"]()
    v = _rhs(5, 77)
    product = functools.partial(
        headwater.curvature.curvature_matvec, case.model, case.task, case.train, kind, chunk_size=7
    )
    ways = {
        "default": product(),
        "cached autograd": product(jacobian_mb=0.0),
        "uncached autograd": product(jacobian_mb=0.0, cache_mb=0.0),
        "no autograd cache": product(cache_mb=0.0),  # GGN: single vectors by Jacobians too
    }
    assert (
        ways["default"].method.split(":")[0]
        == {
            "ggn": "jacobian",
            "hessian": "autograd (cached)",
            "ef": "per-example gradients",
        }[kind]
    )
    assert ways["uncached autograd"].method.split(":")[0] == (
        "per-example gradients" if kind == "ef" else "autograd"
    )
    if kind == "ggn":
        assert "single vectors by autograd" in ways["default"].method
        assert "single vectors" not in ways["no autograd cache"].method
    want = v @ ORACLES[kind](case.model, case.task, case.train)
    for name, matvec in ways.items():
        for _ in range(2):  # the second call reuses the cached Jacobians or linearisations
            assert_close(matvec(v), want, rtol=1e-10, what=name)
            assert_close(matvec(v[:1]), want[:1], rtol=1e-10, what=f"{name}, one vector")


def test_stored_jacobians_only_where_a_forward_pass_is_dear():
    """A dense network with 3 outputs (forward ≈ 2·P FLOPs per example < C·P) keeps the
    autograd product even though its Jacobians fit; the CNN (weight sharing) stores them."""
    mlp, cnn = CASES["mlp"](), CASES["cnn"]()
    dense = headwater.curvature.curvature_matvec(mlp.model, mlp.task, mlp.train)
    shared = headwater.curvature.curvature_matvec(cnn.model, cnn.task, cnn.train)
    assert dense.method.startswith("autograd (cached)")
    assert "not stored Jacobians: forward 0.55 FLOPs per C·P < 1" in dense.method
    assert shared.method.startswith("jacobian") and "forward 1.9 FLOPs per C·P" in shared.method


class _NormNet(torch.nn.Module):
    """Conv - BatchNorm - Tanh - Linear, with an optional side input (``model(x=..., side=...)``)."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2)
        self.side, self.head = torch.nn.Linear(2, 3), torch.nn.Linear(2 * 4 + 3, 3)

    def forward(self, x, side=None):
        side = torch.ones(x.shape[0], 2, dtype=x.dtype) if side is None else side
        h = torch.tanh(self.norm(self.conv(x))).flatten(1)
        return self.head(torch.cat([h, self.side(side)], 1))


@pytest.mark.parametrize("form", ["tensor", "dict"])
def test_jacobian_product_with_batchnorm_and_dict_batch(form):
    """The stored-Jacobian GGN product on a model with BatchNorm (left in train mode: the
    products use eval mode, its running statistics) fed a tensor or a Hugging Face-style
    dict batch equals the autograd product and the dense GGN; the model is untouched."""
    torch.manual_seed(0)
    model = _NormNet().double()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(13, 1, 4, 4, generator=g, dtype=DT)
    side = torch.randn(13, 2, generator=g, dtype=DT)
    y = torch.randint(0, 3, (13,), generator=g)
    data = (x, y) if form == "tensor" else {"x": x, "side": side, "labels": y}
    task = headwater.ClassificationTask(weight_decay=1e-3)
    before = {k: t.clone() for k, t in model.state_dict().items()}
    fast = headwater.curvature.curvature_matvec(model, task, data, chunk_size=5)
    slow = headwater.curvature.curvature_matvec(model, task, data, chunk_size=5, jacobian_mb=0)
    assert fast.method.startswith("jacobian") and slow.method.startswith("autograd")
    v = _rhs(4, sum(p.numel() for p in model.parameters()))
    got = fast(v)
    assert model.training and all(torch.equal(t, before[k]) for k, t in model.state_dict().items())
    assert_close(got, slow(v), rtol=1e-10, what="jacobian vs autograd")
    assert_close(got, v @ dense_ggn(model, task, data), rtol=1e-10, what="dense GGN")


def test_cg_unconverged_warns_and_load_needs_bind(tmp_path):
    case = CASES["mlp"]()
    curv = CG(damping=1e-4, tol=1e-12, max_iter=2, preconditioner="none").fit(
        case.model, case.task, case.train
    )
    with pytest.warns(RuntimeWarning, match="max_iter"):
        curv.solve(_rhs(2, 51))
    curv = CG(damping=0.01, tol=1e-10, preconditioner_rank=5).fit(case.model, case.task, case.train)
    curv.save(tmp_path / "cg")
    loaded = CG(damping=0.01, tol=1e-10, preconditioner_rank=5).load(tmp_path / "cg")
    with pytest.raises(RuntimeError, match="bind"):
        loaded.solve(_rhs(1, 51))
    v = _rhs(2, 51)
    assert_close(loaded.bind(case.model, case.task, case.train).solve(v), curv.solve(v), rtol=1e-12)
    with pytest.raises(ValueError, match="model/task"):
        loaded.bind(CASES["cnn"]().model, CASES["cnn"]().task, CASES["cnn"]().train)


def test_lissa_converged_matches_dense():
    case = CASES["mlp"]()
    curv = LiSSA(damping=0.1, depth=300, preconditioner="none").fit(
        case.model, case.task, case.train
    )
    v = _rhs(3, 51)
    assert _rel(curv.solve(v), torch.linalg.solve(_dense(case, "ggn", 0.1), v.T).T) < 5e-2
    top = torch.linalg.eigvalsh(dense_ggn(case.model, case.task, case.train))[-1].item()
    assert curv.fitted_scale == pytest.approx(1.1 * (top + 0.1), rel=1e-6)


def test_lissa_minibatch_seeded_and_divergence_names_scale():
    case = CASES["mlp"]()
    v = _rhs(2, 51)
    want = torch.linalg.solve(_dense(case, "ggn", 0.1), v.T).T
    kw = {"damping": 0.1, "depth": 60, "repeats": 2, "batch_size": 12}
    a = LiSSA(seed=1, **kw).fit(case.model, case.task, case.train).solve(v)
    b = LiSSA(seed=1, **kw).fit(case.model, case.task, case.train).solve(v)
    c = LiSSA(seed=2, **kw).fit(case.model, case.task, case.train).solve(v)
    assert torch.equal(a, b) and _rel(a, c) > 1e-3  # another seed: other mini-batches, other noise
    assert _rel(a, want) < 0.25  # stochastic: noisy, but the right answer
    with pytest.raises(RuntimeError, match="scale"):
        LiSSA(damping=0.1, depth=500, scale=0.05).fit(case.model, case.task, case.train).solve(v)


# ----------------------------------------------------------------------------- eigen-methods


@pytest.mark.parametrize("cls", [Arnoldi, Lanczos])
@pytest.mark.parametrize("kind", ["ggn", "hessian"])
def test_top_eigenvalues_match_exact(cls, kind):
    case = CASES["cnn"]()
    exact_vals, _ = Exact(kind=kind, damping=2.0).fit(case.model, case.task, case.train).eigen()
    curv = cls(kind=kind, damping=2.0, rank=5, n_iter=60).fit(case.model, case.task, case.train)
    vals, vecs = curv.eigen()
    want = exact_vals[exact_vals.abs().argsort(descending=True)[:5]]
    assert_close(vals, want, rtol=1e-6, atol=1e-10, what=f"{cls.__name__} top-5 eigenvalues")
    assert vecs.shape == (5, 77)
    assert_close(vecs @ vecs.T, torch.eye(5, dtype=DT), atol=1e-8, what="orthonormal eigenvectors")


@pytest.mark.parametrize("cls", [Arnoldi, Lanczos, Nystrom])
@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_full_rank_is_exact(cls, name):
    case = CASES[name]()
    p = sum(q.numel() for q in case.model.parameters())
    curv = cls(damping=1e-3, rank=p).fit(case.model, case.task, case.train)
    dense = _dense(case, "ggn", 1e-3)
    v = _rhs(3, p)
    assert _rel(curv.solve(v), torch.linalg.solve(dense, v.T).T) < 1e-6
    assert _rel(curv.matvec(v), v @ dense) < 1e-9


@pytest.mark.parametrize("cls", [Arnoldi, Lanczos, Nystrom])
@pytest.mark.parametrize("residual", [True, False])
def test_error_falls_as_rank_grows(cls, residual):
    case = CASES["cnn"]()
    v = _rhs(3, 77)
    want = torch.linalg.solve(_dense(case, "ggn", 0.05), v.T).T
    errors = [
        _rel(
            cls(damping=0.05, rank=k, residual=residual)
            .fit(case.model, case.task, case.train)
            .solve(v),
            want,
        )
        for k in (2, 8, 20, 77)
    ]
    assert all(b < a for a, b in itertools.pairwise(errors)), errors
    if residual or cls is Nystrom:
        # Exact at full rank. (A Krylov space breaks down early on the GGN's degenerate
        # weight-decay floor; the residual form assumes exactly that floor.)
        assert errors[-1] < 1e-6, errors


def test_project_is_consistent_with_truncated_solve():
    case = CASES["mlp"]()
    curv = Arnoldi(damping=0.05, rank=10, residual=False).fit(case.model, case.task, case.train)
    g, q = _rhs(6, 51, seed=1), _rhs(3, 51, seed=2)
    low = (curv.project(q) * curv.inverse_eigvals()) @ curv.project(g).T
    assert_close(low, q @ curv.solve(g).T, rtol=1e-10, what="projected scores")
    assert curv.project(g).shape == (6, 10)


def test_minibatch_spectrum():
    case = CASES["cnn"]()
    comp = minibatch_spectrum(
        case.model, case.task, case.train, batch_size=5, n_batches=4, top=3, n_iter=60
    )
    exact_vals, _ = Exact(damping=0.0).fit(case.model, case.task, case.train).eigen()
    assert_close(comp.full, exact_vals[:3], rtol=1e-6, what="full-data spectrum")
    assert comp.minibatch.shape == (4, 3) and comp.inflation.shape == (3,)
    lanczos = Lanczos(damping=0.0, rank=3, n_iter=60).fit(case.model, case.task, case.train)
    assert_close(lanczos.spectrum()[:3], exact_vals[:3], rtol=1e-6, what="Lanczos spectrum")


# ----------------------------------------------------------------------------- diagonal, identity


@pytest.mark.parametrize(
    ("name", "kind"), [("mlp", "ggn"), ("cnn", "ggn"), ("linreg", "ggn"), ("mlp", "ef")]
)
def test_exact_diagonal_equals_dense(name, kind):
    case = CASES[name]()
    curv = Diagonal(kind=kind, damping=0.1, chunk_size=7).fit(case.model, case.task, case.train)
    dense = ORACLES[kind](case.model, case.task, case.train)
    assert_close(curv.state.diagonal, dense.diagonal(), rtol=1e-9, what="diagonal")
    v = _rhs(2, dense.shape[0])
    assert_close(curv.solve(v), v / (dense.diagonal() + 0.1), rtol=1e-9, what="diagonal solve")


@pytest.mark.filterwarnings("ignore:curvature='diagonal'.*probes:RuntimeWarning")
def test_hutchinson_diagonal_converges_and_is_seeded():
    case = CASES["mlp"]()
    want = dense_hessian(case.model, case.task, case.train).diagonal()
    errors = []
    for probes in (16, 256, 2048):
        curv = Diagonal(kind="hessian", method="hutchinson", probes=probes, damping=1.0)
        errors.append(_rel(curv.fit(case.model, case.task, case.train).state.diagonal, want))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 0.15, errors
    a = (
        Diagonal(method="hutchinson", probes=8, seed=4)
        .fit(case.model, case.task, case.train)
        .state.diagonal
    )
    b = (
        Diagonal(method="hutchinson", probes=8, seed=4)
        .fit(case.model, case.task, case.train)
        .state.diagonal
    )
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="method"):
        Diagonal(kind="hessian")


def test_identity_is_gradient_similarity():
    case = CASES["mlp"]()
    est = InfluenceFunction(case.model, case.task, Identity(damping=0.3)).fit(case.train)
    g_tr = loop_gradients(case.model, case.task, case.train)
    g_q = loop_gradients(case.model, case.task, case.query, measurement=True)
    assert_close(
        est.scores(case.query, case.train), g_q @ g_tr.T, rtol=1e-10, what="gradient dot products"
    )
    assert est.curvature.fitted_damping == 1.0


# ----------------------------------------------------------------------------- influence, store, hygiene

_EXACT_REGIME = [
    ("cg", {"tol": 1e-12}, 1e-6),
    ("lissa", {"depth": 400}, 5e-2),
    ("arnoldi", {"rank": 77}, 1e-6),
    ("lanczos", {"rank": 77}, 1e-6),
    ("nystrom", {"rank": 77}, 1e-6),
]


@pytest.mark.parametrize(("name", "options", "rtol"), _EXACT_REGIME)
def test_influence_matches_exact(name, options, rtol):
    case = CASES["cnn"]()
    damping = 0.05
    got = (
        InfluenceFunction(case.model, case.task, CURVATURES[name](damping=damping, **options))
        .fit(case.train)
        .scores(case.query, case.train)
    )
    want = influence_scores(
        case.model,
        case.task,
        case.train,
        case.query,
        dense_ggn(case.model, case.task, case.train),
        damping=damping,
    )
    assert _rel(got, want) < rtol


def test_influence_diagonal_matches_diagonal_oracle():
    case = CASES["mlp"]()
    diag = torch.diag(dense_ggn(case.model, case.task, case.train).diagonal())
    want = influence_scores(case.model, case.task, case.train, case.query, diag, damping=0.01)
    got = headwater.influence(
        case.model, case.train, case.query, task=case.task, curvature="diagonal", damping=0.01
    )
    assert_close(got.values, want, rtol=1e-8, what="diagonal influence")


@pytest.mark.parametrize(
    ("cls", "options"),
    [
        (Arnoldi, {"rank": 8}),
        (Lanczos, {"rank": 8}),
        (Nystrom, {"rank": 8}),
        (Diagonal, {}),
        (Identity, {}),
    ],
)
def test_save_load_same_solve(tmp_path, cls, options):
    case = CASES["cnn"]()
    curv = cls(damping=0.05, **options).fit(case.model, case.task, case.train)
    curv.save(tmp_path / "curv")
    loaded = cls(damping=0.05, **options).load(tmp_path / "curv")
    v = _rhs(3, 77)
    assert torch.equal(loaded.solve(v), curv.solve(v))
    assert torch.equal(loaded.matvec(v), curv.matvec(v))
    with pytest.raises(StoreMismatchError, match="damping"):
        cls(damping=0.5, **options).load(tmp_path / "curv")


def test_default_damping_is_relative_to_trace():
    case = CASES["cnn"]()
    want = Exact().fit(case.model, case.task, case.train).fitted_damping
    assert Diagonal().fit(case.model, case.task, case.train).fitted_damping == pytest.approx(
        want, rel=1e-9
    )
    got = CG(trace_probes=64).fit(case.model, case.task, case.train).fitted_damping
    assert got == pytest.approx(want, rel=0.3)
    dense = torch.linalg.eigvalsh(dense_ggn(case.model, case.task, case.train))
    full = CG().fit(case.model, case.task, case.train).fitted_damping  # 16 probes, as low rank
    for cls in (Arnoldi, Lanczos, Nystrom):  # low rank: the smallest kept eigenvalue, at least
        for rank in (4, 20):  # the dense solve's default (CG's, same probes)
            curv = cls(rank=rank).fit(case.model, case.task, case.train)
            smallest = cls.damping_factor * float(curv.state.eigvals.abs().min())
            assert curv.fitted_damping == pytest.approx(max(smallest, full), rel=1e-9)
            if cls is not Nystrom and rank == 20:  # 40 Krylov steps find the top 20
                assert float(curv.state.eigvals.min()) == pytest.approx(
                    float(dense[-rank]), rel=1e-3
                )
        assert cls.damping_factor == 1.0
    assert float(dense[-4]) > full > float(dense[-20])  # both branches of the max were taken


@pytest.mark.parametrize("cls", [Arnoldi, Lanczos, Nystrom])
def test_default_rank_grows_while_smallest_kept_eigenvalue_above_damping(monkeypatch, cls):
    """With no rank given the rank doubles (here 10 -> 20) while the smallest kept eigenvalue
    is above the damping; the Krylov run that stops early equals the shorter run."""
    from headwater.curvature import _lowrank

    monkeypatch.setattr(_lowrank, "DEFAULT_RANK", 10)
    monkeypatch.setattr(_lowrank, "MAX_DEFAULT_RANK", 20)
    case = CASES["cnn"]()
    dense = torch.linalg.eigvalsh(dense_ggn(case.model, case.task, case.train)).flip(0)
    for damping, want in ((0.5 * float(dense[9]), 20), (2.0 * float(dense[9]), 10)):
        grown = cls(damping=damping).fit(case.model, case.task, case.train)
        fixed = cls(damping=damping, rank=want).fit(case.model, case.task, case.train)
        assert grown.rank == want and grown.state.eigvals.shape == (want,)
        torch.testing.assert_close(grown.state.eigvals, fixed.state.eigvals, rtol=1e-12, atol=0)
        torch.testing.assert_close(grown.state.eigvecs, fixed.state.eigvecs, rtol=0, atol=1e-10)


def test_indefinite_undamped_warns():
    case = CASES["mlp"]()
    case.task.weight_decay = 0.0
    for curv in (
        CG(kind="hessian", damping=0.0),
        Lanczos(kind="hessian", damping=0.0, rank=40, residual=False),
        Arnoldi(kind="hessian", damping=0.0, rank=40, residual=False),
        LiSSA(kind="hessian", damping=0.0),
    ):
        with pytest.warns(RuntimeWarning, match="not positive definite"):
            curv.fit(case.model, case.task, case.train)


@pytest.mark.filterwarnings("ignore:curvature='diagonal'.*probes:RuntimeWarning")
@pytest.mark.parametrize(
    "name", ["cg", "lissa", "arnoldi", "lanczos", "nystrom", "diagonal", "identity"]
)
def test_model_and_global_rng_untouched(name):
    case = CASES["mlp"]()
    case.model.train()
    before = {k: p.detach().clone() for k, p in case.model.named_parameters()}
    rng = torch.get_rng_state()
    options = {
        "lissa": {"depth": 5, "batch_size": 8},
        "diagonal": {"method": "hutchinson", "probes": 4},
    }.get(name, {})
    if name in ("arnoldi", "lanczos", "nystrom"):
        options = {"rank": 5}
    curv = CURVATURES[name](**options).fit(case.model, case.task, case.train)
    curv.solve(_rhs(2, 51))
    assert torch.equal(torch.get_rng_state(), rng)
    assert case.model.training
    for k, p in case.model.named_parameters():
        assert torch.equal(p, before[k]) and p.grad is None and p.requires_grad


def test_bad_arguments_name_the_setting():
    with pytest.raises(ValueError, match="rank"):
        Arnoldi(rank=0)
    with pytest.raises(ValueError, match="n_iter"):
        Lanczos(rank=10, n_iter=5)
    with pytest.raises(ValueError, match="kind"):
        Nystrom(kind="hessian")
    with pytest.raises(ValueError, match="preconditioner_rank"):
        CG(kind="hessian", preconditioner_rank=4)
    with pytest.raises(ValueError, match="depth"):
        LiSSA(depth=0)
    with pytest.raises(ValueError, match="scale"):
        LiSSA(scale=-1.0)
    case = CASES["linreg"]()
    with pytest.raises(ValueError, match="rank"):
        Arnoldi(rank=13).fit(case.model, case.task, case.train)


def test_cg_reports_iterations_with_an_estimated_total():
    case = CASES["mlp"]()
    seen = []
    curv = CG(damping=1e-2, tol=1e-8, preconditioner="none").fit(
        case.model,
        case.task,
        case.train,
        progress=lambda stage, done, total: seen.append((stage, done, total)),
    )
    seen.clear()
    x = curv.solve(_rhs(2, 51))
    rows = [(done, total) for stage, done, total in seen if stage == "CG iterations"]
    assert [d for d, _ in rows] == list(range(1, curv.last_info.iterations + 1))
    assert all(total >= done for done, total in rows) and rows[-1][1] == rows[-1][0]
    assert_close(x, torch.linalg.solve(_dense(case, "ggn", 1e-2), _rhs(2, 51).T).T, rtol=1e-6)


def test_indefiniteness_warning_only_for_a_finite_negative_damped_spectrum():
    from headwater.curvature._matfree import warn_if_indefinite
    from headwater.curvature.operators import MatrixKind

    with pytest.warns(RuntimeWarning, match=r"smallest eigenvalue -1 \+ damping 0.5 <= 0"):
        warn_if_indefinite("cg", MatrixKind.HESSIAN, -1.0, 0.5)
    with warnings.catch_warnings():  # NaN data: the gradient checks name the example instead
        warnings.simplefilter("error")
        warn_if_indefinite("diagonal", MatrixKind.GGN, float("nan"), 0.01)
        warn_if_indefinite("cg", MatrixKind.GGN, 0.0, 0.01)
