"""The default curvature: dense (Cholesky) when it fits the budget, else Arnoldi when its
products fit, else EK-FAC."""

import torch
from cases import CASES
from oracles import assert_close

import headwater
from headwater.curvature import EKFAC, Arnoldi, Exact
from headwater.methods import InfluenceFunction, auto
from headwater.methods.auto import choose_curvature


def test_small_model_gets_the_dense_solve_and_says_why():
    case = CASES["mlp"]()
    lines = []
    scores = headwater.influence(
        case.model,
        case.train,
        case.query,
        task=case.task,
        progress=lambda stage, done, total: lines.append(stage),
    )
    assert scores.settings["curvature"] == "exact" and scores.settings["solver"] == "cholesky"
    assert scores.settings["curvature_choice"] == "exact"
    assert "Cholesky" in scores.settings["curvature_choice_reason"]
    assert lines[0] == scores.settings["curvature_choice_reason"] and "51 parameters" in lines[0]
    want = (
        InfluenceFunction(case.model, case.task, Exact())
        .fit(case.train)
        .scores(case.query, case.train)
    )
    assert_close(scores.values, want, rtol=1e-8)


def test_over_budget_falls_back_to_ekfac():
    case = CASES["cnn"]()
    choice = choose_curvature(case.model, case.task, case.train, budget_seconds=0.0)
    assert choice.name == "ekfac" and "budget" in choice.reason and "77 parameters" in choice.reason
    assert choose_curvature(case.model, case.task, case.train, max_params=10).name == "ekfac"
    assert (
        choose_curvature(case.model, case.task, case.train, kind="hessian", budget_seconds=0.0).name
        == "cg"
    )
    assert choose_curvature(case.model, case.task, case.train).name == "exact"
    scores = headwater.influence(
        case.model, case.train, case.query, task=case.task, curvature="ekfac"
    )
    want = (
        InfluenceFunction(case.model, case.task, EKFAC())
        .fit(case.train)
        .scores(case.query, case.train)
    )
    assert_close(scores.values, want, rtol=1e-10)
    assert "curvature_choice" not in scores.settings  # an explicit curvature is not a choice


def test_the_estimate_grows_with_examples_outputs_and_parameters():
    case = CASES["mlp"]()
    x, y = case.train
    big = (x.repeat(400, 1), y.repeat(400))
    assert choose_curvature(case.model, case.task, big, budget_seconds=1e-3).name == "ekfac"
    assert choose_curvature(case.model, case.task, case.train, budget_seconds=1e-3).name == "exact"
    assert torch.equal(case.train[0], x)


def test_between_dense_and_ekfac_arnoldi_when_its_products_fit(monkeypatch):
    """Over the dense budget, Arnoldi at its defaults (rank 100-200: up to 400 products of M over the
    data, counted on a few examples) is next when those fit the budget; its scores are the
    default Arnoldi's."""
    case = CASES["cnn"]()
    monkeypatch.setattr(auto, "DENSE_MACS_PER_SECOND", 1.0)  # the dense fit now takes ages
    choice = choose_curvature(case.model, case.task, case.train)
    assert choice.name == "arnoldi" and "up to 400 products" in choice.reason, choice.reason
    assert choose_curvature(case.model, case.task, case.train, budget_seconds=0.0).name == "ekfac"
    scores = headwater.influence(case.model, case.train, case.query, task=case.task, progress=False)
    assert scores.settings["curvature_choice"] == "arnoldi"
    want = (
        InfluenceFunction(case.model, case.task, Arnoldi())
        .fit(case.train)
        .scores(case.query, case.train)
    )
    assert_close(scores.values, want, rtol=1e-10)
