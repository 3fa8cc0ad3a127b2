"""K-FAC / EK-FAC: exact regimes equal dense references; EK-FAC beats K-FAC; stores; no side effects."""

import pytest
import torch
from cases import CASES
from oracles import assert_close, dense_ef, dense_ggn, loop_gradients
from torch import Tensor, nn

import headwater
from headwater.curvature import CURVATURES, EKFAC, KFAC, Exact
from headwater.gradients import stack_gradients
from headwater.gradients.layers import DIAGONAL, find_blocks, from_blocks
from headwater.methods import InfluenceFunction
from headwater.methods.factored import factored_scores, module_gradients, module_scores
from headwater.store import StoreMismatchError
from headwater.task import ClassificationTask, RegressionTask

F64 = torch.float64


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _dense(curv, p: int) -> Tensor:
    return curv.matvec(torch.eye(p, dtype=F64))


def _block_mask(curv) -> Tensor:
    """Boolean [P, P] mask of the per-module blocks in the flat layout."""
    slices = curv.layout.slices()
    mask = torch.zeros(curv.layout.num_params, curv.layout.num_params, dtype=torch.bool)
    for b in curv.blocks:
        idx = torch.cat(
            [torch.arange(slices[n].start, slices[n].stop) for n in (b.weight, b.bias) if n]
        )
        mask[idx[:, None], idx[None, :]] = True
    return mask


class Conv1D(nn.Module):
    """Hugging Face GPT-2 style: ``y = x @ W + b`` with ``W [in, nf]``."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf, generator=_gen(5), dtype=F64))
        self.bias = nn.Parameter(torch.randn(nf, generator=_gen(6), dtype=F64))

    def forward(self, x: Tensor) -> Tensor:
        return x @ self.weight + self.bias


class Flat(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x).flatten(1)


def _regression(model: nn.Module, x: Tensor, seed: int = 0):
    with torch.no_grad():
        out = model(x)
    y = out + torch.randn(out.shape, generator=_gen(seed), dtype=F64)
    return RegressionTask(weight_decay=1e-2), (x, y)


def _exact_regimes():
    """Squared error on every output of one layer: K-FAC is the GGN itself."""
    x2 = torch.randn(12, 4, generator=_gen(1), dtype=F64)
    x3 = torch.randn(6, 5, 4, generator=_gen(2), dtype=F64)  # [B, T, D] token sequences
    img = torch.randn(5, 2, 5, 5, generator=_gen(3), dtype=F64)
    sig = torch.randn(5, 2, 7, generator=_gen(4), dtype=F64)
    torch.manual_seed(0)
    return {
        "linear": (nn.Linear(4, 3).double(), x2),
        "sequence": (Flat(nn.Linear(4, 3).double()), x3),
        "conv2d": (Flat(nn.Conv2d(2, 3, 3, stride=2, padding=1).double()), img),
        "conv1d": (Flat(nn.Conv1d(2, 3, 3, dilation=2, padding="same").double()), sig),
        "gpt2_conv1d": (Flat(Conv1D(3, 4)), x3),
    }


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
@pytest.mark.parametrize("regime", list(_exact_regimes()))
def test_exact_regime_equals_ggn(cls, regime):
    model, x = _exact_regimes()[regime]
    task, data = _regression(model, x)
    curv = cls(damping=0.1, ggn_estimator="exact", chunk_size=4).fit(model, task, data)
    p = curv.layout.num_params
    want = dense_ggn(model, task, data) + 0.1 * torch.eye(p, dtype=F64)
    assert_close(_dense(curv, p), want, what=f"{cls.name} {regime}")
    v = torch.randn(3, p, generator=_gen(7), dtype=F64)
    assert_close(curv.solve(v), torch.linalg.solve(want, v.T).T, what="solve")


@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_one_example_cross_entropy_is_exact(kind):
    case = CASES["mlp"]()
    task = ClassificationTask(weight_decay=1e-2, modules=["2"])  # last layer only
    one = (case.train[0][:1], case.train[1][:1])
    oracle = dense_ggn if kind == "ggn" else dense_ef
    for cls in (KFAC, EKFAC):
        curv = cls(kind=kind, damping=0.0, ggn_estimator="exact").fit(case.model, task, one)
        assert_close(_dense(curv, 21), oracle(case.model, task, one), what=f"{cls.name} {kind}")


@pytest.mark.slow
def test_sampled_fisher_approaches_exact():
    case = CASES["mlp"]()
    exact = KFAC(damping=0.0, ggn_estimator="exact").fit(case.model, case.task, case.train)
    many = tuple(t.repeat(500, *([1] * (t.dim() - 1))) for t in case.train)  # 500 draws each

    def sampled(**kw):
        return KFAC(damping=0.0, seed=1, ggn_estimator="sampled", **kw).fit(
            case.model, case.task, many
        )

    a, b = _dense(exact, 51), _dense(sampled(chunk_size=4000), 51)
    assert (a - b).norm() / a.norm() < 0.05
    assert torch.equal(_dense(sampled(chunk_size=4000), 51), b)  # same seed, same numbers
    # each example draws from its own generator: other chunks, same draws (sums reordered)
    assert_close(
        _dense(sampled(chunk_size=7), 51),
        b,
        rtol=1e-12,
        atol=1e-12 * float(b.abs().max()),
        what="sampled K-FAC, chunks of 7",
    )
    # another seed: other draws, as far from the first as sampling noise, as close to the truth
    c = _dense(
        KFAC(damping=0.0, seed=2, ggn_estimator="sampled", chunk_size=4000).fit(
            case.model, case.task, many
        ),
        51,
    )
    assert (c - b).norm() / a.norm() > 1e-3 and (a - c).norm() / a.norm() < 0.05


def test_sampled_kfac_matches_the_exact_ggn_in_scale_as_mc_samples_grows():
    """Each of the mc_samples draws carries weight 1/mc_samples: the sampled factors keep the
    exact GGN's scale (trace) at every mc_samples and approach it as the draws grow (without
    the weight the trace would grow with mc_samples)."""
    case = CASES["mlp"]()
    exact = _dense(
        KFAC(damping=0.0, ggn_estimator="exact").fit(case.model, case.task, case.train), 51
    )
    reps = tuple(t.repeat(20, *([1] * (t.dim() - 1))) for t in case.train)  # 480 examples
    errors = {}
    for m in (1, 4, 16, 64):
        sampled = _dense(
            KFAC(damping=0.0, seed=1, mc_samples=m, ggn_estimator="sampled").fit(
                case.model, case.task, reps
            ),
            51,
        )
        assert abs(float(sampled.trace() / exact.trace()) - 1) < 0.05, m  # measured within 0.025
        errors[m] = float((sampled - exact).norm() / exact.norm())
    assert errors[16] < errors[1] / 2 and errors[64] < errors[1] / 2, (
        errors
    )  # 0.040 -> 0.006, 0.009


def test_auto_estimator_is_exact_for_few_outputs_else_sampled():
    from headwater.curvature.kfac import EXACT_MAX_OUTPUTS, GGNEstimator

    assert GGNEstimator("auto").resolve(10) is GGNEstimator.EXACT
    assert GGNEstimator("auto").resolve(EXACT_MAX_OUTPUTS + 1) is GGNEstimator.SAMPLED
    assert GGNEstimator("sampled").resolve(2) is GGNEstimator.SAMPLED
    case = CASES["mlp"]()
    auto = EKFAC(damping=0.0).fit(case.model, case.task, case.train)
    exact = EKFAC(damping=0.0, ggn_estimator="exact").fit(case.model, case.task, case.train)
    v = torch.randn(3, 51, generator=_gen(0), dtype=F64)
    assert torch.equal(auto.solve(v), exact.solve(v))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_ekfac_eigenvalues_are_mean_squared_rotated_gradients(name):
    """``(1/N) Σ_n (Q_Sᵀ G_n Q_A)²`` with the empirical Fisher, from explicit per-example
    block gradients: checks the T = 1 shortcut (mlp) and the general path (conv)."""
    case = CASES[name]()
    curv = EKFAC(kind="ef", damping=0.0).fit(case.model, case.task, case.train)
    grads = next(module_gradients(case.model, case.task, curv.blocks, case.train, chunk_size=100))
    for b in curv.blocks:
        qa, qs = curv.state.eigvecs_a[b.module], curv.state.eigvecs_s[b.module]
        want = (qs.T @ grads[b.module] @ qa).square().mean(0)
        assert_close(curv.state.corrected[b.module], want, what=b.module)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_ekfac_closer_to_block_ggn_than_kfac(name):
    case = CASES[name]()
    kfac = KFAC(damping=0.0, ggn_estimator="exact").fit(case.model, case.task, case.train)
    ekfac = EKFAC(damping=0.0, ggn_estimator="exact").fit(case.model, case.task, case.train)
    p = kfac.layout.num_params
    truth = dense_ggn(case.model, case.task, case.train) * _block_mask(kfac)
    k, e = _dense(kfac, p), _dense(ekfac, p)
    # EK-FAC is the Frobenius projection of the block GGN onto the matrices diagonal in K-FAC's
    # eigenbasis (George et al. 2018): its residual is orthogonal to that space, K-FAC included
    residual = truth - e
    for other in (k, e):
        assert abs(float((residual * other).sum())) < 1e-10 * float(truth.norm() * other.norm())
    err_k, err_e = (k - truth).norm(), residual.norm()
    assert err_e < 0.95 * err_k, (
        err_e,
        err_k,
    )  # strictly closer (mlp 0.37 vs 0.44, cnn 0.59 vs 0.64)
    assert (_dense(ekfac, p) * ~_block_mask(kfac)).abs().max() < 1e-12  # block-diagonal


def test_chunk_size_invariance_and_matvec_solve():
    case = CASES["cnn"]()
    a = EKFAC(ggn_estimator="exact", chunk_size=3).fit(case.model, case.task, case.train)
    b = EKFAC(ggn_estimator="exact", chunk_size=64).fit(case.model, case.task, case.train)
    v = torch.randn(4, 77, generator=_gen(0), dtype=F64)
    assert_close(a.solve(v), b.solve(v), what="chunk invariance")
    assert_close(a.matvec(a.solve(v)), v, what="matvec(solve(v))")


def test_default_damping_is_relative_per_module():
    case = CASES["mlp"]()
    curv = KFAC(relative_damping=0.1, ggn_estimator="exact").fit(case.model, case.task, case.train)
    for b, damping in zip(curv.blocks, curv.state.damping.tolist(), strict=True):
        assert damping == pytest.approx(0.1 * float(curv.state.eigenvalues(b.module).mean()))
    assert curv.fitted_damping == pytest.approx(float(curv.state.damping.mean()))


@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_save_load_round_trip_and_refusal(tmp_path, cls):
    case = CASES["cnn"]()
    curv = cls(damping=0.05).fit(case.model, case.task, case.train)
    curv.save(tmp_path / "factors")
    v = torch.randn(3, 77, generator=_gen(1), dtype=F64)
    loaded = cls(damping=0.05).load(tmp_path / "factors")
    assert torch.equal(loaded.solve(v), curv.solve(v))
    with pytest.raises(StoreMismatchError, match="damping"):
        cls(damping=0.1).load(tmp_path / "factors")
    with pytest.raises(StoreMismatchError, match="seed"):
        cls(damping=0.05, seed=3).load(tmp_path / "factors")
    other = EKFAC if cls is KFAC else KFAC
    with pytest.raises(StoreMismatchError, match="curvature"):
        other(damping=0.05).load(tmp_path / "factors")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_factor_storage_dtype(tmp_path, dtype):
    case = CASES["mlp"]()
    full = EKFAC(damping=0.1).fit(case.model, case.task, case.train)
    low = EKFAC(damping=0.1, factor_dtype=dtype).fit(case.model, case.task, case.train)
    assert low.state.eigvecs_a["0"].dtype == getattr(torch, dtype)
    low.save(tmp_path / "f")
    back = EKFAC(damping=0.1, factor_dtype=dtype).load(tmp_path / "f")
    v = torch.randn(2, 51, generator=_gen(2), dtype=F64)
    assert torch.equal(back.solve(v), low.solve(v))
    tol = 1e-5 if dtype == "float32" else 5e-2
    assert (low.solve(v) - full.solve(v)).norm() / full.solve(v).norm() < tol


def test_model_unchanged():
    case = CASES["cnn"]()
    model = case.model.train()
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    flags = {k: p.requires_grad for k, p in model.named_parameters()}
    rng = torch.get_rng_state()
    curv = EKFAC().fit(model, case.task, case.train)
    module_scores(model, case.task, curv, case.query, case.train)
    assert torch.equal(torch.get_rng_state(), rng)
    for name, module in model.named_modules():
        assert module.training, name
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert not module._backward_hooks, name
    for k, p in model.named_parameters():
        assert p.grad is None and p.requires_grad == flags[k] and torch.equal(p, before[k])


def test_parameters_outside_supported_layers_form_the_diagonal_block():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    data = (torch.randn(5, 3, dtype=F64), torch.randint(0, 2, (5,)))
    curv = KFAC().fit(model, ClassificationTask(), data)
    assert [b.module for b in curv.blocks] == ["0", "2", DIAGONAL]
    assert curv.blocks[-1].params == ("1.weight", "1.bias")
    curv = KFAC().fit(
        model, ClassificationTask(modules=["0", "2"]), data
    )  # selection skips the norm
    assert [b.module for b in curv.blocks] == ["0", "2"]
    grouped = nn.Conv2d(2, 2, 3, groups=2)
    blocks = find_blocks(grouped, dict(grouped.named_parameters()))
    assert [b.params for b in blocks] == [("weight", "bias")]  # grouped convolution: diagonal
    with pytest.raises(ValueError, match="kind"):
        KFAC(kind="hessian")
    with pytest.raises(ValueError, match="factor_dtype"):
        EKFAC(factor_dtype="float16")


def test_module_gradients_match_per_example_loop():
    case = CASES["cnn"]()
    curv = KFAC().fit(case.model, case.task, case.train)
    got = [
        from_blocks(g, curv.blocks, curv.layout)
        for g in module_gradients(
            case.model, case.task, curv.blocks, case.query, objective="measurement", chunk_size=3
        )
    ]
    want = loop_gradients(case.model, case.task, case.query, measurement=True)
    assert_close(torch.cat(got), want, what="module gradients")


def test_influence_with_ekfac_matches_exact_in_exact_regime():
    case = CASES["linreg"]()
    exact = InfluenceFunction(case.model, case.task, Exact(damping=1e-3)).fit(case.train)
    ekfac = InfluenceFunction(
        case.model, case.task, EKFAC(damping=1e-3, ggn_estimator="exact")
    ).fit(case.train)
    want = exact.scores(case.query, case.train)
    assert_close(ekfac.scores(case.query, case.train), want, what="EK-FAC vs exact influence")
    fac = factored_scores(
        case.model, case.task, ekfac.curvature, case.query, case.train, chunk_size=7
    )
    assert_close(fac, want, what="factored vs exact influence")


def test_module_scores_sum_to_flat_influence():
    case = CASES["mlp"]()
    est = InfluenceFunction(case.model, case.task, EKFAC()).fit(case.train)
    parts = module_scores(
        case.model, case.task, est.curvature, case.query, case.train, chunk_size=5
    )
    assert list(parts) == ["0", "2"] and parts["0"].shape == (5, 24)
    flat = (
        est.preconditioned_queries(case.query)
        @ stack_gradients(case.model, case.task, case.train).T
    )
    assert_close(sum(parts.values()), flat, what="sum of modules vs flat-layout scores")
    assert_close(
        est.scores(case.query, case.train), flat, what="InfluenceFunction (per-module path)"
    )
    with pytest.raises(TypeError, match="curvature"):
        module_scores(
            case.model,
            case.task,
            Exact().fit(case.model, case.task, case.train),
            case.query,
            case.train,
        )


def test_registered_and_one_call_api():
    assert CURVATURES["kfac"] is KFAC and CURVATURES["ekfac"] is EKFAC
    case = CASES["mlp"]()
    scores = headwater.influence(
        case.model, case.train, case.query, task=case.task, curvature="ekfac"
    )
    curv = EKFAC().fit(
        case.model, case.task, case.train
    )  # the oracle: dense gradients, EK-FAC's solve
    g_query = stack_gradients(case.model, case.task, case.query, objective="measurement")  # [5, P]
    want = curv.solve(g_query) @ stack_gradients(case.model, case.task, case.train).T
    assert_close(
        scores.values, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()), what="one-call API"
    )


def test_a_task_written_for_the_two_argument_sample_targets_still_samples():
    """``sample_targets(output, generator)`` (before it also received the targets) still works."""
    case = CASES["mlp"]()

    class OldTask(type(case.task)):
        def sample_targets(self, output, generator):
            return torch.multinomial(torch.softmax(output, dim=-1), 1, generator=generator).squeeze(
                -1
            )

    old = OldTask(weight_decay=case.task.weight_decay)
    a = KFAC(damping=1e-3, ggn_estimator="sampled", seed=4).fit(case.model, old, case.train)
    b = KFAC(damping=1e-3, ggn_estimator="sampled", seed=4).fit(case.model, case.task, case.train)
    assert_close(_dense(a, 51), _dense(b, 51), rtol=1e-12)  # the same draws as the built-in task


def test_ekfac_correction_takes_fresh_sampled_targets():
    """Sampled EK-FAC: the basis comes from each example's first draw, the eigenvalues from its
    second (independent of the basis, so ``E[Λ | Q] = diag(Qᵀ M Q)``). Checked by hand on a
    softmax regression (one position: the signal is the cotangent ``p − e_y``)."""
    from headwater.task import sample_per_example

    g = _gen(3)
    x = torch.randn(40, 4, generator=g, dtype=F64)
    y = torch.randint(0, 3, (40,), generator=g)
    model = nn.Sequential(nn.Linear(4, 3).double())
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(3, 4, generator=g, dtype=F64))
    task = ClassificationTask()
    curv = EKFAC(damping=0.0, ggn_estimator="sampled", seed=7, chunk_size=16).fit(
        model, task, (x, y)
    )
    with torch.no_grad():
        logits = model(x)
    p = logits.softmax(-1)
    first, second = sample_per_example(task, logits, y, seed=7, first=0, draws=2)
    a = torch.cat([x, torch.ones(40, 1, dtype=F64)], dim=1)  # [N, width], bias last
    s_basis = p - nn.functional.one_hot(first, 3).double()  # [N, out]
    s = curv.state
    qs, qa = s.eigvecs_s["0"].double(), s.eigvecs_a["0"].double()
    assert_close(
        qs @ torch.diag(s.eigvals_s["0"].double()) @ qs.T,
        s_basis.T @ s_basis / 40,
        rtol=1e-10,
        what="S from the first draws",
    )

    def eigenvalues(signal: Tensor) -> Tensor:
        return ((signal @ qs)[:, :, None] * (a @ qa)[:, None, :]).square().mean(0)  # [out, width]

    fresh = eigenvalues(p - nn.functional.one_hot(second, 3).double())
    assert_close(
        s.corrected["0"].double(),
        fresh,
        rtol=1e-10,
        what="EK-FAC eigenvalues from the second draws",
    )
    assert not torch.allclose(
        eigenvalues(s_basis), fresh, rtol=1e-3
    )  # the test tells the two apart
