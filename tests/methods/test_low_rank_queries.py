"""K-FAC/EK-FAC low-rank queries (``query_rank``): exact at full rank, within the σ_{r+1}
bound below it, the same through scores, top-k and module scores, validated and recorded."""

from __future__ import annotations

import pytest
import torch
from cases import _init, cnn
from oracles import assert_close
from torch import nn

import headwater
from headwater.curvature import EKFAC, KFAC
from headwater.methods import InfluenceFunction
from headwater.methods.factored import (
    BlockFactors,
    LowRankBlocks,
    module_factors,
    module_gradients,
    module_scores,
    truncated_blocks,
)
from headwater.task import ClassificationTask

F64 = torch.float64


def _wide():
    """8 -> 12 -> 3 tanh MLP (blocks [12, 9] and [3, 13]: rank 1-2 truncations are smaller)."""
    model = _init(nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 3)).double(), 3)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(36, 8, generator=g, dtype=F64)
    y = torch.randint(0, 3, (36,), generator=g)
    task = ClassificationTask(weight_decay=1e-2, measurement="margin")
    return model, task, (x[:30], y[:30]), (x[30:], y[30:])


def _case(name: str):
    if name == "mlp":
        return _wide()
    case = cnn()  # a convolution: 9 positions per example
    return case.model, case.task, case.train, case.query


def _fitted(name: str, cls=EKFAC, **options):
    model, task, train, query = _case(name)
    return model, task, train, query, cls(**options).fit(model, task, train)


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_full_rank_factors_give_the_full_rank_scores(name):
    model, task, train, query, curv = _fitted(name)
    want = InfluenceFunction(model, task, curv).scores(query, train)
    (grads,) = module_gradients(model, task, curv.blocks, query, objective="measurement")
    full = max(min(b.out_features, b.width) for b in curv.blocks)
    parts = truncated_blocks(curv.eigenbasis_blocks(grads), full, whole_if_cheaper=False)
    assert all(isinstance(p, tuple) for p in parts.values())  # the factor path, every block
    (factors,) = module_factors(model, task, curv.blocks, train, chunk_size=100)
    got = LowRankBlocks(parts).dot(BlockFactors(factors))
    assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()), what="factors")
    curv.query_rank = full  # the public path keeps every block whole here: the same numbers
    got = InfluenceFunction(model, task, curv).scores(query, train)
    assert_close(got, want, rtol=1e-10, atol=1e-12 * float(want.abs().max()), what="query_rank")


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("cls", [KFAC, EKFAC])
def test_truncation_error_is_within_the_next_singular_value_bound(name, cls):
    """|⟨G̃ − G̃_r, G_i⟩| <= σ_{r+1}(G̃) Σ_t ‖s_t‖ ‖ã_t‖ per block, query and example."""
    model, task, train, query, curv = _fitted(name, cls)
    exact = module_scores(model, task, curv, query, train)
    (grads,) = module_gradients(model, task, curv.blocks, query, objective="measurement")
    sigma = {
        m: torch.nn.functional.pad(torch.linalg.svdvals(g), (0, 2))  # [Q, k + 2]: σ_{k+1} = 0
        for m, g in curv.solve_blocks(grads).items()
    }
    (factors,) = module_factors(model, task, curv.blocks, train, chunk_size=100)
    nuclear = {
        m: (s.norm(dim=2) * a.norm(dim=2)).sum(1) for m, (s, a) in factors.items()
    }  # [N]: Σ_t ‖s_t‖ ‖ã_t‖ >= ‖G_i‖_*
    errors = []
    for rank in (1, 2):
        curv.query_rank = rank
        low = module_scores(model, task, curv, query, train)
        for m, want in exact.items():
            err = (low[m] - want).abs()  # [Q, N]
            bound = sigma[m][:, rank, None] * nuclear[m][None, :]
            assert bool((err <= bound * (1 + 1e-9) + 1e-13 * float(want.abs().max())).all()), m
        errors.append(sum(float((low[m] - exact[m]).norm()) for m in exact))
    assert errors[0] > errors[1] > 0  # a real truncation, shrinking with the rank


@pytest.mark.parametrize("name", ["mlp", "cnn"])
def test_top_k_scores_and_self_influence_agree(name):
    model, task, train, query, curv = _fitted(name, query_rank=1)
    est = InfluenceFunction(model, task, curv, chunk_size=7)
    scores = est.scores(query, train)
    values, indices = est.top_k(query, train, 5)
    top = scores.topk(5, dim=1)
    assert_close(values, top.values, rtol=1e-12, atol=0.0, what="top-k values")
    assert torch.equal(indices, top.indices)
    both = est.attribute(query, train, top_k=5, self_influence=True)
    assert torch.equal(both.indices, top.indices)
    full = InfluenceFunction(model, task, EKFAC().fit(model, task, train))
    assert_close(both.self_influence, full.self_influence(train), rtol=1e-10, what="self")
    assert not torch.allclose(scores, full.scores(query, train), rtol=1e-3)  # truncated


def test_option_is_validated_recorded_and_not_part_of_the_store_key(tmp_path):
    for bad in (0, -1, 1.5, True, "4"):
        with pytest.raises(ValueError, match="query_rank"):
            EKFAC(query_rank=bad)
    model, task, train, query = _wide()
    store = tmp_path / "ekfac"
    first = headwater.influence(
        model, train, query, task=task, curvature="ekfac", store=store
    )  # fitted and stored at full rank
    assert first.settings["query_rank"] is None
    low = headwater.influence(
        model,
        train,
        query,
        task=task,
        curvature="ekfac",
        store=store,
        curvature_options={"query_rank": 2},
    )
    assert low.settings["query_rank"] == 2 and "loaded" in low.settings["store"]
    assert not torch.allclose(low.values, first.values, rtol=1e-3)
