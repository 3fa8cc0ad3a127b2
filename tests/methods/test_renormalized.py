"""Renormalized influence equals the dense oracle divided by the right norm; cosine
limits; agreement with renormalised TracIn; no side effects; errors."""

import copy

import pytest
import torch
from cases import CASES
from oracles import assert_close, dense_ggn, influence_scores, loop_gradients

from headwater.curvature import Exact, Identity
from headwater.methods import InfluenceFunction
from headwater.methods.renormalized import RenormalizedInfluence, layer_slices
from headwater.methods.tracin import Checkpoint, TracIn
from headwater.task import Measurement


def _fitted(case, damping=0.01):
    return InfluenceFunction(case.model, case.task, Exact(damping=damping), chunk_size=7).fit(
        case.train
    )


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_gradient_norm_matches_oracle(name):
    case = CASES[name]()
    est = _fitted(case)
    want = influence_scores(
        case.model,
        case.task,
        case.train,
        case.query,
        dense_ggn(case.model, case.task, case.train),
        damping=0.01,
    )
    g_tr = loop_gradients(case.model, case.task, case.train)
    got = RenormalizedInfluence(est).scores(case.query, case.train)
    assert_close(got, want / g_tr.norm(dim=1), rtol=1e-6, atol=1e-10, what=f"{name} renormalized")
    g_q = loop_gradients(case.model, case.task, case.query, measurement=True)
    both = RenormalizedInfluence(est, normalize_query=True).scores(case.query, case.train)
    assert_close(
        both,
        want / g_tr.norm(dim=1) / g_q.norm(dim=1, keepdim=True),
        rtol=1e-6,
        atol=1e-10,
        what=f"{name} renormalized, query normalised",
    )
    # the order within a query never depends on normalize_query
    assert torch.equal(both.argsort(dim=1), got.argsort(dim=1))


def test_layerwise_normalises_each_module_block():
    case = CASES["mlp"]()  # layers "0" (Linear 4->6) and "2" (Linear 6->3)
    est = _fitted(case)
    layers = layer_slices(est.curvature.layout)
    assert sorted(layers) == ["0", "2"] and all(len(s) == 2 for s in layers.values())
    g_tr = loop_gradients(case.model, case.task, case.train)
    unit = g_tr.clone()
    for slices in layers.values():
        norm = torch.cat([g_tr[:, sl] for sl in slices], dim=1).norm(dim=1, keepdim=True)
        for sl in slices:
            unit[:, sl] = g_tr[:, sl] / norm
    g_q = loop_gradients(case.model, case.task, case.query, measurement=True)
    want = est.curvature.solve(g_q) @ unit.T
    got = RenormalizedInfluence(est, norm="layer").scores(case.query, case.train)
    assert_close(got, want, rtol=1e-9, atol=1e-12, what="layerwise")


def test_curvature_norm_gives_cosines_in_the_inverse_metric():
    case = CASES["cnn"]()
    est = _fitted(case)
    ri = RenormalizedInfluence(est, norm="curvature", normalize_query=True)
    # a training set scored against itself (query = train, measurement = loss) has unit diagonal
    case.task.measure = Measurement.LOSS
    self_scores = ri.scores(case.train, case.train)
    assert_close(
        self_scores.diagonal(), torch.ones(self_scores.shape[0], dtype=torch.float64), rtol=1e-9
    )
    assert self_scores.abs().max() <= 1 + 1e-9
    g = loop_gradients(case.model, case.task, case.train)
    si = (g * est.curvature.solve(g)).sum(1)
    plain = est.scores(case.query, case.train)
    assert_close(
        RenormalizedInfluence(est, norm="curvature").scores(case.query, case.train),
        plain / si.sqrt(),
        rtol=1e-9,
        what="divided by sqrt(self-influence)",
    )


def test_identity_curvature_equals_renormalized_tracin_at_one_checkpoint():
    case = CASES["mlp"]()
    est = InfluenceFunction(case.model, case.task, Identity()).fit(case.train)
    ri = RenormalizedInfluence(est, normalize_query=True).scores(case.query, case.train)
    state = {k: v.clone() for k, v in case.model.state_dict().items()}
    gas = TracIn(case.model, case.task, [Checkpoint(state, 1.0)], renormalize=True).scores(
        case.query, case.train
    )
    assert_close(ri, gas, rtol=1e-10, what="cosine similarity (GAS with one checkpoint)")


def test_top_k_matches_full_scores_and_model_is_untouched():
    case = CASES["mlp"]()
    before = copy.deepcopy(case.model.state_dict())
    case.model.train()
    est = _fitted(case)
    ri = RenormalizedInfluence(est, norm="layer")
    full = ri.scores(case.query, case.train)
    values, indices = ri.top_k(case.query, case.train, 4)
    assert torch.equal(indices, full.topk(4, dim=1).indices)
    assert_close(values, full.topk(4, dim=1).values, rtol=1e-12)
    assert case.model.training
    assert all(p.grad is None for p in case.model.parameters())
    for k, v in case.model.state_dict().items():
        assert torch.equal(v, before[k])
    assert ri.settings()["norm"] == "layer" and ri.settings()["method"] == "renormalized_influence"


def test_errors_name_the_argument():
    case = CASES["mlp"]()
    unfitted = InfluenceFunction(case.model, case.task, Exact(damping=0.01))
    with pytest.raises(RuntimeError, match="influence"):
        RenormalizedInfluence(unfitted)
    est = _fitted(case)
    with pytest.raises(ValueError, match="norm"):
        RenormalizedInfluence(est, norm="l1")
    with pytest.raises(TypeError, match="influence"):
        RenormalizedInfluence(case.model)
    with pytest.raises(TypeError, match="normalize_query"):
        RenormalizedInfluence(est, normalize_query=1)
