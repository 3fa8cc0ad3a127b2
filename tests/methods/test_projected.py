"""Random projections and influence in the projected space, against dense oracles."""

from __future__ import annotations

import json
import math

import pytest
import torch
from cases import CASES, mlp
from oracles import assert_close, dense_ef, dense_ggn, influence_scores, loop_gradients
from torch.utils.data import Dataset

import headwater
from headwater.gradients.projection import KroneckerProjection, RandomProjection
from headwater.methods.projected import ProjectedInfluence
from headwater.store import StoreMismatchError


# ------------------------------------------------------------------ projection
def test_projection_is_the_blockwise_matrix_and_seeded():
    g = torch.randn(7, 300, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    proj = RandomProjection(16, seed=3, block_size=64)
    pi = proj.matrix(300)
    assert pi.shape == (16, 300)
    assert_close(proj(g), g @ pi.T, rtol=1e-12)
    assert_close(proj(g[2]), (g @ pi.T)[2], rtol=1e-12)
    assert set(torch.unique(pi * math.sqrt(16)).tolist()) == {-1.0, 1.0}
    assert_close(proj.gram(300), pi @ pi.T, rtol=1e-12)
    # same seed: same matrix, also without the block cache; another seed: another matrix
    assert torch.equal(RandomProjection(16, seed=3, block_size=64, cache_mb=0).matrix(300), pi)
    other = RandomProjection(16, seed=4, block_size=64).matrix(
        300
    )  # independent signs: cosine ~ 1/sqrt(4800)
    assert abs(float((other * pi).sum() / (other.norm() * pi.norm()))) < 0.1
    assert set(torch.unique(other * math.sqrt(16)).tolist()) == {-1.0, 1.0}
    # rows of examples are independent of how they are chunked
    assert_close(torch.cat([proj(g[:3]), proj(g[3:])]), proj(g), rtol=1e-12)


@pytest.mark.parametrize("kind", ["rademacher", "gaussian"])
def test_projection_preserves_inner_products(kind):
    """Johnson–Lindenstrauss: relative error of ⟨Πx, Πy⟩ / (|x||y|) is about 1/√k."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(40, 2000, dtype=torch.float64, generator=gen)
    proj = RandomProjection(1024, kind=kind, seed=0, block_size=500)
    exact = x @ x.T
    approx = proj(x) @ proj(x).T
    norms = exact.diag().sqrt()
    err = (approx - exact) / torch.outer(norms, norms)
    assert err.abs().max() < 6 / math.sqrt(1024)
    assert err.diag().abs().mean() < 2.5 / math.sqrt(1024)  # squared norms: sd √(2/k)


def test_projection_rejects_bad_arguments():
    with pytest.raises(ValueError, match="dim"):
        RandomProjection(0)
    with pytest.raises(ValueError, match="kind"):
        RandomProjection(4, kind="sparse")
    with pytest.raises(ValueError, match="seed"):
        RandomProjection(4, seed=-1)
    with pytest.raises(ValueError, match="grads"):
        RandomProjection(4)(torch.zeros(2, 3, 4))


# ------------------------------------------------------------------ projected influence
@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_full_rank_projection_is_exact_influence(kind):
    """k = P with a (invertible) Gaussian Π reproduces the dense influence function."""
    case = mlp()
    p = sum(t.numel() for t in case.model.parameters())
    proj = RandomProjection(p, kind="gaussian", seed=0)
    est = ProjectedInfluence(
        case.model, case.task, proj, kind=kind, damping=1e-3, ggn_estimator="exact", chunk_size=7
    ).fit(case.train)
    matrix = (dense_ggn if kind == "ggn" else dense_ef)(case.model, case.task, case.train)
    expected = influence_scores(case.model, case.task, case.train, case.query, matrix, damping=1e-3)
    assert_close(est.scores(case.query, case.train), expected, rtol=1e-6, atol=1e-8)
    values, indices = est.top_k(case.query, case.train, 3)
    top = expected.topk(3, dim=1)
    assert torch.equal(indices, top.indices)
    assert_close(values, top.values, rtol=1e-6)
    # self-influence: the oracle's query side is the measurement, here the training loss
    own = torch.diag(
        influence_scores(case.model, case.task, case.train, case.train, matrix, damping=1e-3)
    )
    assert_close(est.self_influence(case.train), own, rtol=1e-6, atol=1e-8)


def test_error_falls_with_projection_dimension():
    """Mean relative error over 5 seeds of the projected influence shrinks as k grows
    (measured: 0.65, 0.38, 0.15, 2e-13 at k = 12, 25, 40, 51 = P)."""
    case = mlp(n_train=40)
    exact = headwater.influence(
        case.model, case.train, case.query, task=case.task, curvature="exact", damping=1e-3
    ).values
    errors = []
    for k in (12, 25, 40, 51):
        errs = [
            (
                (
                    ProjectedInfluence(
                        case.model,
                        case.task,
                        RandomProjection(k, kind="gaussian", seed=s),
                        damping=1e-3,
                    )
                    .fit(case.train)
                    .scores(case.query)
                    - exact
                ).norm()
                / exact.norm()
            ).item()
            for s in range(5)
        ]
        errors.append(sum(errs) / 5)
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 1e-8 and errors[0] > 0.3


def test_sampled_ggn_approaches_exact_ggn():
    case = mlp(n_train=40)
    proj = RandomProjection(20, seed=0)
    exact = ProjectedInfluence(
        case.model, case.task, proj, damping=1e-2, ggn_estimator="exact"
    ).fit(case.train)
    sampled = ProjectedInfluence(
        case.model, case.task, proj, damping=1e-2, ggn_estimator="sampled", mc_samples=200
    ).fit(case.train)
    a, b = exact.scores(case.query), sampled.scores(case.query)
    assert torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1] > 0.98


class _Failing(Dataset):
    """The training set, raising once more than ``reads`` examples have been read."""

    def __init__(self, data, reads=None):
        self.x, self.y = data
        self.reads = reads

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        if self.reads is not None:
            if self.reads == 0:
                raise RuntimeError("interrupted")
            self.reads -= 1
        return self.x[i], self.y[i]


def _forward_calls(model, fit):
    calls = [0]
    handle = model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        fit()
    finally:
        handle.remove()
    return calls[0]


def test_store_resumes_after_an_interruption_and_refuses_other_settings(tmp_path):
    case = mlp(n_train=30)
    reference = ProjectedInfluence(case.model, case.task, 12, damping=1e-3, chunk_size=8).fit(
        case.train
    )
    expected = reference.scores(case.query)
    path = tmp_path / "proj"
    with pytest.raises(
        RuntimeError, match="interrupted"
    ):  # 30 reads fingerprint the data, then chunks of 8
        ProjectedInfluence(case.model, case.task, 12, damping=1e-3, chunk_size=8, store=path).fit(
            _Failing(case.train, reads=30 + 20)
        )
    record = json.loads((tmp_path / "proj-train.json").read_text())
    assert record["rows_done"] == 16 and record["shape"] == [
        30,
        12,
    ]  # two whole chunks were counted
    resumed = ProjectedInfluence(case.model, case.task, 12, damping=1e-3, chunk_size=8, store=path)
    projected_rows, features = [], resumed._featurizer.features
    resumed._featurizer.features = lambda batch, *a: (
        projected_rows.append(len(batch[1])) or features(batch, *a)
    )
    resumed.fit(_Failing(case.train))
    assert projected_rows == [8, 6]  # only the rows the interrupted run had not counted
    assert_close(resumed.scores(case.query), expected, rtol=1e-10)
    # a third run reads both stores and computes no training gradient at all
    seen = []
    again = ProjectedInfluence(
        case.model,
        case.task,
        12,
        damping=1e-3,
        chunk_size=8,
        store=path,
        progress=lambda stage, done, total: seen.append(stage),
    )
    assert _forward_calls(case.model, lambda: again.fit(case.train)) == 0
    assert "projected curvature (loaded)" in seen
    assert_close(again.scores(case.query), expected, rtol=1e-10)
    # another damping reuses both stores; another chunk size too (it changes no number)
    ProjectedInfluence(case.model, case.task, 12, damping=1.0, chunk_size=5, store=path).fit(
        case.train
    )
    ef = ProjectedInfluence(case.model, case.task, 12, kind="ef", store=path)
    with pytest.raises(
        StoreMismatchError, match="kind"
    ):  # the rows are reused, the curvature is not
        ef.fit(case.train)
    with pytest.raises(StoreMismatchError, match=r"projection\.seed"):
        ProjectedInfluence(case.model, case.task, 12, seed=1, store=path).fit(case.train)
    other = mlp(seed=1, n_train=30)  # same architecture and settings, other weights
    with pytest.raises(StoreMismatchError, match="model"):
        ProjectedInfluence(other.model, other.task, 12, store=path).fit(case.train)


def test_bad_input_is_named():
    case = mlp()
    with pytest.raises(TypeError, match="projection"):
        ProjectedInfluence(case.model, case.task, 2.5)
    with pytest.raises(ValueError, match="kind"):
        ProjectedInfluence(case.model, case.task, 4, kind="hessian")
    with pytest.raises(ValueError, match="projection: 52 dimensions exceed the 51"):
        ProjectedInfluence(case.model, case.task, 52)
    est = ProjectedInfluence(case.model, case.task, 4)
    with pytest.raises(RuntimeError, match="fit"):
        est.scores(case.query)
    est.fit(case.train)
    with pytest.raises(ValueError, match="train"):
        est.scores(case.query, (case.train[0][:3], case.train[1][:3]))


def test_api_projection_matches_the_class():
    case = mlp()
    scores = headwater.influence(
        case.model, case.train, case.query, task=case.task, projection=16, damping=1e-3
    )
    direct = (
        ProjectedInfluence(case.model, case.task, 16, damping=1e-3)
        .fit(case.train)
        .scores(case.query)
    )
    assert_close(scores.values, direct, rtol=1e-12)
    assert scores.settings["curvature"] == "projected"
    with pytest.raises(ValueError, match="curvature"):
        headwater.influence(
            case.model, case.train, case.query, task=case.task, projection=16, curvature="cg"
        )


# ------------------------------------------------------------------ Kronecker (per-layer) projection
@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("kind", ["ggn", "ef"])
def test_kronecker_projection_wider_than_every_layer_is_exact(name, kind):
    """Sides no larger than their dims are kept whole, so this is the dense influence."""
    case = CASES[name]()
    proj = KroneckerProjection(32, 32, seed=0)
    est = ProjectedInfluence(
        case.model, case.task, proj, kind=kind, damping=1e-3, ggn_estimator="exact", chunk_size=6
    ).fit(case.train)
    matrix = (dense_ggn if kind == "ggn" else dense_ef)(case.model, case.task, case.train)
    expected = influence_scores(case.model, case.task, case.train, case.query, matrix, damping=1e-3)
    assert_close(est.scores(case.query), expected, rtol=1e-6, atol=1e-8)


def test_kronecker_features_are_the_projected_layer_gradients():
    """φ = (P_out ⊗ P_in) vec([∇W | ∇b]) per layer, against loop-of-backward gradients."""
    case = mlp()
    proj = KroneckerProjection(2, 3, kind="gaussian", seed=5)
    est = ProjectedInfluence(
        case.model, case.task, proj, kind="ef", damping=1e-3, chunk_size=5
    ).fit(case.train)
    grads = loop_gradients(case.model, case.task, case.train)  # [n, P] in parameter order
    expected, col = [], 0
    for j, layer in enumerate([case.model[0], case.model[2]]):
        out, inp = layer.weight.shape
        w = grads[:, col : col + out * inp].reshape(-1, out, inp)
        b = grads[:, col + out * inp : col + out * inp + out].reshape(-1, out, 1)
        col += out * inp + out
        p_out, p_in = proj.factors(j, out, inp + 1, torch.float64)
        assert p_out.shape == (2, out) and p_in.shape == (3, inp + 1)
        expected.append((p_out @ torch.cat([w, b], dim=2) @ p_in.T).flatten(1))
    assert_close(est._features, torch.cat(expected, dim=1), rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="dim_in"):
        KroneckerProjection(2, 0)


@pytest.mark.parametrize("which", ["flat", "kronecker"])
def test_default_damping_is_relative_to_the_projected_trace(which):
    """damping=None: ``DEFAULT_RELATIVE_DAMPING · trace(K + wd·Π Πᵀ) / trace(Π Πᵀ)``, with
    ``K = mean Π g gᵀ Πᵀ`` (EF) and ``Π`` formed explicitly; the solve uses ``wd + λ``."""
    from headwater.curvature.base import DEFAULT_RELATIVE_DAMPING

    case = mlp()
    grads = loop_gradients(case.model, case.task, case.train)  # [n, P]
    if which == "flat":
        proj = RandomProjection(6, kind="gaussian", seed=3)
        pi = proj.matrix(grads.shape[1])  # [k, P]
    else:
        proj = KroneckerProjection(2, 3, kind="gaussian", seed=5)
        blocks = []
        for j, layer in enumerate([case.model[0], case.model[2]]):
            out, inp = layer.weight.shape
            p_out, p_in = proj.factors(j, out, inp + 1, torch.float64)
            # vec([W | b]) in parameter order: W row-major, then b
            full = torch.kron(p_out, p_in)  # acts on [out, inp + 1] row-major
            order = torch.arange(out * (inp + 1)).reshape(out, inp + 1)
            perm = torch.cat([order[:, :inp].flatten(), order[:, inp]])
            blocks.append(full[:, perm])
        pi = torch.block_diag(*blocks)
    est = ProjectedInfluence(case.model, case.task, proj, kind="ef", chunk_size=5).fit(case.train)
    phi = grads @ pi.T
    gram, wd = pi @ pi.T, case.task.weight_decay
    k = phi.T @ phi / len(grads) + wd * gram
    want = DEFAULT_RELATIVE_DAMPING * float(k.trace() / gram.trace())
    assert est.fitted_damping == pytest.approx(want, rel=1e-9)
    assert_close(est._features, phi, rtol=1e-10, atol=1e-12)
    query = loop_gradients(case.model, case.task, case.query) @ pi.T
    expected = query @ torch.linalg.solve(k + want * gram, phi.T)
    assert_close(est.scores(case.query), expected, rtol=1e-6, atol=1e-9)


class _Tokens(torch.nn.Module):
    """Linear layers over [B, T, d] token features, mean-pooled: the K-FAC blocks see T positions."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Linear(3, 5)
        self.head = torch.nn.Linear(5, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)).mean(dim=1))


def test_kronecker_projection_sums_over_sequence_positions():
    """Per-example gradients of layers applied at every token are Σ_t s_t ã_tᵀ: with dims
    wider than every layer the projected influence is the dense one."""
    torch.manual_seed(0)
    model = _Tokens().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(18, 4, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 2, (18,), generator=gen)
    task = mlp().task
    train, query = (x[:14], y[:14]), (x[14:], y[14:])
    est = ProjectedInfluence(
        model, task, KroneckerProjection(8, 8), damping=1e-3, ggn_estimator="exact"
    ).fit(train)
    expected = influence_scores(
        model, task, train, query, dense_ggn(model, task, train), damping=1e-3
    )
    assert_close(est.scores(query), expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("top_k", [None, 4])
def test_fused_attribute_is_the_separate_methods(top_k):
    """Scores (or top-k) and self-influence from one pass over the stored features equal
    the separate methods; with ``k = P`` the self-influence is the dense ``gᵢᵀ(M+λI)⁻¹gᵢ``."""
    case = mlp(n_train=30)
    est = ProjectedInfluence(
        case.model, case.task, 51, damping=1e-2, chunk_size=7, query_chunk=2
    ).fit(case.train)
    got = est.attribute(case.query, case.train, top_k=top_k, self_influence=True)
    values, indices, si = got.values, got.indices, got.self_influence
    if top_k is None:
        assert indices is None
        assert torch.equal(values, est.scores(case.query, case.train))
    else:
        ref_values, ref_indices = est.top_k(case.query, case.train, top_k)
        assert torch.equal(indices, ref_indices) and torch.equal(values, ref_values)
        low_values, low_indices = est.top_k(case.query, case.train, top_k, largest=False)
        assert torch.equal(got.opponent_indices, low_indices) and torch.equal(
            got.opponent_values, low_values
        )
    assert torch.equal(si, est.self_influence(case.train))
    g = loop_gradients(case.model, case.task, case.train)
    matrix = dense_ggn(case.model, case.task, case.train) + 1e-2 * torch.eye(
        g.shape[1], dtype=g.dtype
    )
    assert_close(si, (torch.linalg.solve(matrix, g.T).T * g).sum(1), rtol=1e-6)
