"""headwater.influence(store=...): a fitted curvature is saved, then loaded instead of refitted."""

from __future__ import annotations

import pytest
import torch
from cases import mlp
from oracles import assert_close

import headwater
from headwater.curvature import CURVATURES as CURVATURE_CLASSES
from headwater.store import StoreMismatchError

CURVATURES = {
    "exact": {},
    "ekfac": {},
    "kfac": {},
    "cg": {"tol": 1e-10},
    "cg-nystrom": {"tol": 1e-10, "preconditioner_rank": 8},
    "arnoldi": {"rank": 10},
    "nystrom": {"rank": 10},
    "diagonal": {},
    "mfac": {},
}


@pytest.mark.parametrize("name", list(CURVATURES))
def test_second_call_loads_the_fit_and_gives_the_same_scores(name, tmp_path, monkeypatch):
    case = mlp(n_train=30)
    curvature = name.split("-")[0]
    options = CURVATURES[name]
    kwargs = dict(task=case.task, curvature=curvature, damping=1e-2, curvature_options=options)
    plain = headwater.influence(case.model, case.train, case.query, **kwargs).values
    path = tmp_path / "fit"
    first = headwater.influence(case.model, case.train, case.query, store=path, **kwargs).values
    assert_close(first, plain, rtol=1e-12, atol=1e-14)

    def no_fit(*args, **kw):
        raise AssertionError("the stored fit should have been loaded")

    monkeypatch.setattr(type(CURVATURE_CLASSES[curvature]()), "_fit", no_fit)
    stages = []
    again = headwater.influence(
        case.model,
        case.train,
        case.query,
        store=path,
        progress=lambda stage, done, total: stages.append(stage),
        **kwargs,
    ).values
    # CG re-attached to the data after loading sums its products in another order (~1e-10)
    assert_close(again, plain, rtol=1e-9, atol=1e-9 * float(plain.abs().max()))
    assert "curvature (loaded)" in stages


def test_a_store_of_another_model_data_or_setting_is_refused(tmp_path):
    case = mlp(n_train=30)
    path = tmp_path / "fit"
    headwater.influence(
        case.model,
        case.train,
        case.query,
        task=case.task,
        curvature="ekfac",
        damping=1e-2,
        store=path,
    )
    other = mlp(seed=3, n_train=30)  # same architecture, other weights
    with pytest.raises(StoreMismatchError, match="context"):
        headwater.influence(
            other.model,
            case.train,
            case.query,
            task=case.task,
            curvature="ekfac",
            damping=1e-2,
            store=path,
        )
    shuffled = (case.train[0].flip(0), case.train[1].flip(0))
    with pytest.raises(StoreMismatchError, match="context"):
        headwater.influence(
            case.model,
            shuffled,
            case.query,
            task=case.task,
            curvature="ekfac",
            damping=1e-2,
            store=path,
        )
    with pytest.raises(StoreMismatchError, match="damping"):
        headwater.influence(
            case.model,
            case.train,
            case.query,
            task=case.task,
            curvature="ekfac",
            damping=1e-1,
            store=path,
        )
    with pytest.raises(ValueError, match="store"):
        headwater.influence(
            case.model,
            case.train,
            case.query,
            task=case.task,
            method="tracin",
            checkpoints=[],
            store=path,
        )


def test_projection_store_through_the_api(tmp_path):
    case = mlp(n_train=30)
    kwargs = dict(task=case.task, projection=12, damping=1e-2)
    first = headwater.influence(
        case.model, case.train, case.query, store=tmp_path / "p", **kwargs
    ).values
    stages = []
    again = headwater.influence(
        case.model,
        case.train,
        case.query,
        store=tmp_path / "p",
        progress=lambda stage, done, total: stages.append(stage),
        **kwargs,
    ).values
    assert torch.equal(first, again)
    assert "projected curvature (loaded)" in stages and "projected gradients (train)" not in stages
    assert (tmp_path / "p-train.npy").is_file() and (tmp_path / "p-curvature.json").is_file()


def test_a_fit_for_the_loss_serves_the_margin(tmp_path):
    """The query measurement is not part of a fit: the store is loaded, the scores change."""
    from headwater.task import ClassificationTask

    case = mlp(n_train=30)
    loss = headwater.influence(
        case.model,
        case.train,
        case.query,
        task=case.task,
        curvature="ekfac",
        damping=1e-2,
        store=tmp_path / "fit",
    ).values
    margin_task = ClassificationTask(weight_decay=case.task.weight_decay, measurement="margin")
    stages = []
    margin = headwater.influence(
        case.model,
        case.train,
        case.query,
        task=margin_task,
        curvature="ekfac",
        damping=1e-2,
        store=tmp_path / "fit",
        progress=lambda stage, done, total: stages.append(stage),
    ).values
    assert "curvature (loaded)" in stages
    fresh = headwater.influence(
        case.model, case.train, case.query, task=margin_task, curvature="ekfac", damping=1e-2
    ).values
    assert_close(margin, fresh, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(margin, loss)
    with pytest.raises(ValueError, match="query_batch"):
        headwater.influence(
            case.model, case.train, case.query, task=case.task, projection=8, query_batch=2
        )
