"""Influence scores equal the dense oracle; tile invariance; top-k; self-influence; the API."""

import pytest
import torch
from cases import CASES
from oracles import assert_close, dense_ggn, influence_scores, loop_gradients

import headwater
from headwater.curvature import CURVATURES, Exact
from headwater.methods import InfluenceFunction


@pytest.mark.parametrize("name", ["mlp", "cnn", "linreg"])
def test_scores_match_oracle(name):
    case = CASES[name]()
    est = InfluenceFunction(case.model, case.task, Exact(damping=0.01)).fit(case.train)
    got = est.scores(case.query, case.train)
    want = influence_scores(
        case.model,
        case.task,
        case.train,
        case.query,
        dense_ggn(case.model, case.task, case.train),
        damping=0.01,
    )
    assert got.shape == (case.query[0].shape[0], case.train[0].shape[0])
    assert_close(got, want, rtol=1e-6, atol=1e-9, what=f"{name} scores")


def test_tile_sizes_do_not_change_scores():
    case = CASES["cnn"]()
    curv = Exact(damping=0.01).fit(case.model, case.task, case.train)
    ref = InfluenceFunction(case.model, case.task, curv).scores(case.query, case.train)
    for chunk, qchunk in [(1, 1), (3, 2), (7, 100)]:
        est = InfluenceFunction(case.model, case.task, curv, chunk_size=chunk, query_chunk=qchunk)
        assert_close(est.scores(case.query, case.train), ref, rtol=1e-12, what="tiled scores")


def test_top_k_and_self_influence():
    case = CASES["mlp"]()
    est = InfluenceFunction(case.model, case.task, Exact(damping=0.01), chunk_size=5).fit(
        case.train
    )
    full = est.scores(case.query, case.train)
    values, indices = est.top_k(case.query, case.train, 4)
    want_v, want_i = full.topk(4, dim=1)
    assert torch.equal(indices, want_i)
    assert_close(values, want_v, rtol=1e-12)
    low_v, _ = est.top_k(case.query, case.train, 3, largest=False)
    assert_close(low_v, full.topk(3, dim=1, largest=False).values, rtol=1e-12)
    g = loop_gradients(case.model, case.task, case.train)
    si = est.self_influence(case.train)
    assert_close(si, (g @ est.curvature.solve(g).T).diagonal(), rtol=1e-9, what="self-influence")
    assert (si > 0).all()


def test_one_call_api_matches_class():
    case = CASES["mlp"]()
    scores = headwater.influence(
        case.model,
        case.train,
        case.query,
        task=case.task,
        curvature="exact",
        damping=0.01,
        self_influence=True,
    )
    est = InfluenceFunction(case.model, case.task, Exact(damping=0.01)).fit(case.train)
    assert_close(scores.values, est.scores(case.query, case.train), rtol=1e-12)
    assert scores.self_influence.shape == (24,)
    assert scores.settings["curvature"] == "exact" and scores.settings["fitted_damping"] == 0.01
    top = headwater.influence(
        case.model, case.train, case.query, task=case.task, curvature="exact", damping=0.01, top_k=3
    )
    assert top.indices.shape == (5, 3)
    assert torch.equal(top.indices, scores.values.topk(3, dim=1).indices)


def test_default_task_from_targets():
    case = CASES["linreg"]()
    scores = headwater.influence(case.model, case.train, case.query, curvature="exact", damping=0.0)
    task = headwater.RegressionTask()
    est = InfluenceFunction(case.model, task, Exact(damping=0.0)).fit(case.train)
    assert_close(scores.values, est.scores(case.query, case.train), rtol=1e-12)


@pytest.mark.parametrize("curvature", ["exact", "ekfac", "cg"])
def test_query_batches_give_the_same_scores_and_top_k(curvature):
    """``query_batch`` holds fewer preconditioned queries at once; every number is unchanged,
    and each batch streams the training gradients once more."""
    case = CASES["mlp"](n_query=7)
    kwargs = dict(task=case.task, curvature=curvature, damping=1e-2)
    whole = headwater.influence(case.model, case.train, case.query, **kwargs)
    done = []
    batched = headwater.influence(
        case.model,
        case.train,
        case.query,
        query_batch=3,
        **kwargs,
        progress=lambda stage, d, total: done.append(stage) if d == total else None,
    )
    # The batches change only the shapes of the products (the BLAS summation order), so the
    # scores may differ by rounding amplified by the damped curvature's condition number (CG
    # iterates on it): 100 * cond * eps of the largest score; a wrong batch moves them by O(1).
    eig = torch.linalg.eigvalsh(dense_ggn(case.model, case.task, case.train)) + 1e-2
    atol = (
        100
        * float(eig.max() / eig.min())
        * torch.finfo(whole.values.dtype).eps
        * float(whole.values.abs().max())
    )
    torch.testing.assert_close(batched.values, whole.values, rtol=0, atol=atol)
    assert sum("(train)" in s for s in done) == 3  # ceil(7 / 3) passes over the training data
    top = headwater.influence(case.model, case.train, case.query, query_batch=3, top_k=4, **kwargs)
    ref = whole.values.topk(4, dim=1)
    assert torch.equal(top.indices, ref.indices)
    torch.testing.assert_close(top.values, ref.values, rtol=0, atol=atol)
    with pytest.raises(ValueError, match="query_batch"):
        headwater.influence(case.model, case.train, case.query, query_batch=0, **kwargs)


@pytest.mark.parametrize("curvature", ["exact", "ekfac", "cg"])
@pytest.mark.parametrize("top_k", [None, 4])
def test_self_influence_comes_from_the_scoring_pass(curvature, top_k):
    """With ``self_influence=True`` the scores and the self-influence share one pass over the
    training gradients (two for CG, whose solve streams the data); the numbers are those
    of the separate methods."""
    case = CASES["mlp"](n_query=7)
    est = InfluenceFunction(
        case.model, case.task, CURVATURES[curvature](damping=1e-2), chunk_size=5
    ).fit(case.train)
    passes = []

    def progress(stage, done, total):
        if done == total and stage in ("gradients (train)", "module gradients (train)"):
            passes.append(stage)

    est.progress = progress
    got = est.attribute(case.query, case.train, top_k=top_k, self_influence=True)
    values, indices, si = got.values, got.indices, got.self_influence
    assert len(passes) == (2 if curvature == "cg" else 1), passes
    est.progress = None
    want = est.scores(case.query, case.train)
    want_si = est.self_influence(case.train)
    assert_close(si, want_si, rtol=1e-10, what="self-influence")
    if top_k is None:
        assert indices is None
        assert_close(values, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()), what="scores")
    else:
        assert torch.equal(indices, want.topk(top_k, dim=1).indices)
        assert_close(values, want.topk(top_k, dim=1).values, rtol=1e-10)
        low = want.topk(top_k, dim=1, largest=False)  # the opponents, from the same pass
        assert torch.equal(got.opponent_indices, low.indices)
        assert_close(got.opponent_values, low.values, rtol=1e-10)
    api = headwater.influence(
        case.model,
        case.train,
        case.query,
        task=case.task,
        curvature=curvature,
        damping=1e-2,
        chunk_size=5,
        top_k=top_k,
        self_influence=True,
    )
    assert_close(api.self_influence, want_si, rtol=1e-10, what="API self-influence")


def test_ekfac_scores_use_whole_gradients_when_layers_miss_a_use():
    """A weight also used outside its module: block-by-block scoring from hooked layer
    gradients would miss that use, so EK-FAC scores come from the whole (vmap) gradients."""
    from cases import OutsideUse

    from headwater.curvature import EKFAC

    case = CASES["mlp"]()
    torch.manual_seed(0)
    model = OutsideUse().double()
    est = InfluenceFunction(model, case.task, EKFAC(damping=1e-2), chunk_size=5).fit(case.train)
    g_tr = loop_gradients(model, case.task, case.train)
    g_q = loop_gradients(model, case.task, case.query, measurement=True)
    want = g_q @ est.curvature.solve(g_tr).T
    assert_close(est.scores(case.query, case.train), want, rtol=1e-9)
    got = est.attribute(case.query, case.train, self_influence=True)
    values, si = got.values, got.self_influence
    assert_close(values, want, rtol=1e-9)
    assert_close(si, (g_tr * est.curvature.solve(g_tr)).sum(1), rtol=1e-9)
