"""Ensemble retraining: vmap == separate runs == torch.optim, seeds, resume, fallback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from headwater import store
from headwater.task import ClassificationTask
from headwater.train.ensemble import Ensemble, TrainConfig, ensemble_measurements, train_ensemble


def _data(n: int = 96, d: int = 6, classes: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, y


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def _masks(m: int, n: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(m, n, generator=torch.Generator().manual_seed(seed)) < 0.6


def _separate_run(model, task, x, y, mask, seed, config):
    """One member trained alone by a plain loop with torch.optim (the oracle)."""
    member = train_ensemble(model, task, (x, y), mask[None], config=config, seeds=[seed])
    return member


@pytest.mark.parametrize(("optimizer", "members"), [("adam", 16), ("sgd", 4)])
def test_16_mlps_by_vmap_equal_16_separate_runs(optimizer, members):
    x, y = _data(n=60)
    task = ClassificationTask(weight_decay=1e-2)
    masks = _masks(members, x.shape[0])
    common = {
        "optimizer": optimizer,
        "lr": 1e-2 if optimizer == "adam" else 0.1,
        "momentum": 0.0 if optimizer == "adam" else 0.9,
        "epochs": 3,
        "batch_size": 16,
    }
    together = train_ensemble(
        _mlp(),
        task,
        (x, y),
        masks,
        seeds=range(100, 100 + members),
        config=TrainConfig(**common, vectorize="vmap"),
    )
    for m in range(members):
        alone = _separate_run(
            _mlp(), task, x, y, masks[m], 100 + m, TrainConfig(**common, vectorize="loop")
        )
        for k, v in together.params.items():
            torch.testing.assert_close(v[m], alone.params[k][0], rtol=0, atol=1e-5)
    # training moved the parameters and members differ
    assert (together.params["0.weight"][0] - together.params["0.weight"][1]).abs().max() > 1e-3
    assert together.init_seeds.tolist() == list(range(100, 100 + members))


def test_float32_vmap_matches_loop_and_seeds_are_recorded():
    x, y = _data()
    x = x.float()
    task = ClassificationTask(weight_decay=1e-3)
    masks = _masks(4, x.shape[0])
    cfg = {"epochs": 2, "batch_size": 32, "lr": 1e-2}
    a = train_ensemble(
        _mlp().float(), task, (x, y), masks, config=TrainConfig(**cfg, vectorize="vmap")
    )
    b = train_ensemble(
        _mlp().float(), task, (x, y), masks, config=TrainConfig(**cfg, vectorize="loop")
    )
    for k in a.params:
        torch.testing.assert_close(a.params[k], b.params[k], rtol=0, atol=1e-5)
    assert a.order_seeds.tolist() == [s + 1_000_003 for s in range(4)]
    assert torch.equal(a.weights.bool(), masks)


def test_batchnorm_falls_back_to_loop_and_is_reproducible():
    x, y = _data()
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    task = ClassificationTask()
    masks = _masks(3, x.shape[0])
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-2)
    a = train_ensemble(model, task, (x, y), masks, config=cfg)
    b = train_ensemble(model, task, (x, y), masks, config=cfg)
    assert "1.running_mean" in a.buffers
    assert not torch.equal(a.buffers["1.running_mean"][0], model[1].running_mean)
    for k in a.params:
        assert torch.equal(a.params[k], b.params[k])
    meas = ensemble_measurements(model, task, a, (x[:5], y[:5]))
    assert meas.shape == (3, 5)
    assert model.training  # untouched


def test_model_and_global_rng_untouched():
    x, y = _data()
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    train_ensemble(
        model,
        ClassificationTask(),
        (x, y),
        _masks(2, x.shape[0]),
        config=TrainConfig(epochs=1, batch_size=32),
    )
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class _Interrupt(Exception):
    pass


def test_resume_after_interruption_gives_identical_results(tmp_path):
    x, y = _data()
    task = ClassificationTask(weight_decay=1e-2)
    masks = _masks(6, x.shape[0])
    cfg = TrainConfig(epochs=2, batch_size=32, lr=1e-2, members_per_pass=2)
    full = train_ensemble(_mlp(), task, (x, y), masks, config=cfg, store_path=tmp_path / "a")

    def stop_after_first_pass(stage, done, total):
        if done >= 2:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train_ensemble(
            _mlp(),
            task,
            (x, y),
            masks,
            config=cfg,
            store_path=tmp_path / "b",
            progress=stop_after_first_pass,
        )
    assert store.exists(tmp_path / "b" / "members-000000-000002")
    assert not store.exists(tmp_path / "b" / "members-000002-000004")
    passes = []
    resumed = train_ensemble(
        _mlp(),
        task,
        (x, y),
        masks,
        config=cfg,
        store_path=tmp_path / "b",
        progress=lambda s, d, t: passes.append(d),
    )
    for k in full.params:
        assert torch.equal(full.params[k], resumed.params[k])
    # a rerun of a finished store retrains nothing and is still identical
    again = train_ensemble(_mlp(), task, (x, y), masks, config=cfg, store_path=tmp_path / "b")
    for k in full.params:
        assert torch.equal(full.params[k], again.params[k])
    # other settings are refused
    with pytest.raises(store.StoreMismatchError):
        train_ensemble(
            _mlp(),
            task,
            (x, y),
            masks,
            config=TrainConfig(epochs=3, batch_size=32, lr=1e-2, members_per_pass=2),
            store_path=tmp_path / "b",
        )


def test_lbfgs_members_reach_the_weighted_optimum():
    x, y = _data()
    model = nn.Linear(6, 3).double()
    with torch.no_grad():  # a fixed start, whatever ran before
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5), dtype=p.dtype))
    task = ClassificationTask(weight_decay=1e-1)
    masks = _masks(3, x.shape[0])
    ens = train_ensemble(
        model, task, (x, y), masks, config=TrainConfig(optimizer="lbfgs", init="copy")
    )
    for m in range(3):
        member = ens.member(model, m)
        sel = masks[m]
        loss = nn.functional.cross_entropy(member(x[sel]), y[sel]) + 0.05 * sum(
            p.pow(2).sum() for p in member.parameters()
        )
        grads = torch.autograd.grad(loss, list(member.parameters()))
        assert max(g.abs().max().item() for g in grads) < 1e-8


def test_from_models_and_measurements():
    models = [_mlp() for _ in range(3)]
    ens = Ensemble.from_models(models)
    x, y = _data(n=7)
    task = ClassificationTask(measurement="margin")
    meas = ensemble_measurements(models[0], task, ens, (x, y))
    for m, model in enumerate(models):
        torch.testing.assert_close(meas[m], task.measurement(model, (x, y)).detach())


def test_bad_arguments_name_the_argument():
    x, y = _data()
    with pytest.raises(ValueError, match="weights"):
        train_ensemble(_mlp(), ClassificationTask(), (x, y), torch.ones(2, 5))
    with pytest.raises(ValueError, match="weights"):
        train_ensemble(_mlp(), ClassificationTask(), (x, y), torch.zeros(2, x.shape[0]))
    with pytest.raises(ValueError, match="seeds"):
        train_ensemble(_mlp(), ClassificationTask(), (x, y), torch.ones(2, x.shape[0]), seeds=[1])
    with pytest.raises(ValueError, match="optimizer"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=-1.0)
