"""Exact metagradients of a recorded run: finite differences of real retraining, checkpointing
and query batching invariance, recorder round trip, bad input."""

from __future__ import annotations

import dataclasses
import math
import warnings
from types import SimpleNamespace

import pytest
import torch
from cases import cnn, mlp
from oracles import assert_close
from torch.func import functional_call

from headwater.evaluate import single_model_ground_truth
from headwater.gradients.functional import evaluation_mode
from headwater.methods import metagradient_chunks
from headwater.methods.metagradient import Metagradient
from headwater.store import StoreMismatchError
from headwater.task import ClassificationTask
from headwater.train.recorder import (
    Checkpoint,
    Recorder,
    RunRecord,
    check_reached,
    load_run,
    replay,
    with_indices,
)

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.3, momentum=0.9, nesterov=True, weight_decay=1e-2),
    "sgd_plain": lambda p: torch.optim.SGD(p, lr=0.3),
    "sgd_heavy_ball": lambda p: torch.optim.SGD(p, lr=0.2, momentum=0.8, weight_decay=1e-2),
    "adam": lambda p: torch.optim.Adam(p, lr=0.05, weight_decay=1e-2),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1),
}


def record(
    case, optimizer: str, *, every: int = 3, epochs: int = 3, batch: int = 8, clip: bool = True
):
    """Train ``case.model`` in place with a user-style loop (warm-up schedule, clipping in
    epoch 1) and return its :class:`RunRecord`."""
    task = ClassificationTask(measurement=case.task.measure)  # the optimizer holds the weight decay
    x, y = case.train
    opt = OPTIMIZERS[optimizer](case.model.parameters())
    sched = torch.optim.lr_scheduler.LinearLR(opt, 0.3, 1.0, total_iters=4)
    rec = Recorder(case.model, opt, n_train=x.shape[0], checkpoint_every=every, seed=1)
    gen = torch.Generator().manual_seed(1)
    for epoch in range(epochs):
        for idx in torch.randperm(x.shape[0], generator=gen).split(batch):
            opt.zero_grad()
            task.train_loss(case.model, (x[idx], y[idx])).mean().backward()
            rec.step(idx, max_norm=0.5 if clip and epoch == 1 else None)
            sched.step()
    return task, rec.finish()


def measured(
    case, task, run: RunRecord, weights: torch.Tensor, normalization: str = "mean"
) -> torch.Tensor:
    """The query measurements of the model retrained (replayed) at ``weights``, in eval mode."""
    params = replay(case.model, task, case.train, run, weights=weights, normalization=normalization)
    with evaluation_mode(case.model):
        return task.measurement(lambda inp: functional_call(case.model, params, (inp,)), case.query)


def finite_differences(
    case, task, run: RunRecord, cols, at: torch.Tensor | None = None, normalization="mean"
) -> torch.Tensor:
    """``[Q, len(cols)]``: central differences (step 1e-5) of the retrained query
    measurements in the weight of each example of ``cols``, around the weights ``at``
    (default all 1)."""
    n, eps = case.train[1].shape[0], 1e-5
    at = torch.ones(n, dtype=torch.float64) if at is None else at
    out = []
    for i in cols:
        up, down = at.clone(), at.clone()
        up[i], down[i] = at[i] + eps, at[i] - eps
        out.append(
            measured(case, task, run, up, normalization)
            - measured(case, task, run, down, normalization)
        )
    return torch.stack(out, dim=1) / (2 * eps)


@pytest.mark.parametrize(
    ("make", "optimizer", "normalization"),
    [
        (mlp, "sgd", "mean"),
        (mlp, "adam", "mean"),
        (cnn, "sgd", "mean"),
        (cnn, "adamw", "mean"),
        (mlp, "sgd_plain", "mean"),
        (mlp, "sgd_heavy_ball", "mean"),
        (mlp, "sgd", "n"),
        (mlp, "adam", "n"),
    ],
)
def test_equals_finite_differences_of_retraining(make, optimizer, normalization):
    case = make(n_train=20, n_query=3)
    task, run = record(case, optimizer)
    hyper = Metagradient(case.model, task, run, normalization=normalization).hypergradients(
        case.query, case.train
    )  # [Q, n]
    cols = list(range(0, case.train[0].shape[0], 3))  # every third example: the test stays fast
    fd = finite_differences(case, task, run, cols, normalization=normalization)
    assert fd.abs().max() > 1e-4  # the run does depend on the weights
    assert_close(hyper[:, cols], fd, rtol=1e-5, atol=1e-5 * float(fd.abs().max()), what="dm/dw")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_at_other_weights_equals_finite_differences_of_retraining(optimizer):
    """At weights other than the recorded ones the run passes through other states: every
    segment is recomputed from the weighted run's own checkpoint, not the recorded one."""
    case = mlp(n_train=20, n_query=3)
    task, run = record(case, optimizer)
    assert len(run.checkpoints) > 3
    at = torch.ones(20, dtype=torch.float64)
    at[[2, 5, 11]], at[7] = 0, 0.5
    hyper = Metagradient(case.model, task, run).hypergradients(case.query, case.train, weights=at)
    cols = [0, 3, 7, 12]
    fd = finite_differences(case, task, run, cols, at)
    assert fd.abs().max() > 1e-3
    assert_close(
        hyper[:, cols], fd, rtol=1e-5, atol=1e-5 * float(fd.abs().max()), what="dm/dw at w != 1"
    )


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_checkpointed_equals_all_states_and_blocks_equal_one_at_a_time(optimizer):
    case = mlp(n_train=20, n_query=4)
    start = {k: v.clone() for k, v in case.model.state_dict().items()}
    task, sparse = record(case, optimizer, every=4)
    case.model.load_state_dict(start)
    _, dense = record(
        case, optimizer, every=10_000
    )  # one segment: every state recomputed from step 0
    assert len(sparse.checkpoints) > 3 and len(dense.checkpoints) == 2
    full = Metagradient(case.model, task, sparse).scores(case.query, case.train)
    assert_close(
        full,
        Metagradient(case.model, task, dense).scores(case.query, case.train),
        rtol=0,
        atol=1e-10,
        what="checkpointed vs all states",
    )
    single = Metagradient(case.model, task, sparse, query_block=1).scores(case.query, case.train)
    assert_close(full, single, rtol=0, atol=1e-10, what="batched vs one query at a time")


@pytest.mark.parametrize("optimizer", ["sgd_heavy_ball", "sgd", "adam"])
def test_query_chunks_equal_one_chunk(optimizer, monkeypatch):
    case = mlp(n_train=20, n_query=5)
    task, run = record(case, optimizer)
    monkeypatch.setattr(metagradient_chunks, "TEMPORARIES", 1e9)  # only the cap CHUNK binds
    monkeypatch.setattr(metagradient_chunks, "LIMIT", 1e9)
    sizes = []
    for cap in (5, 3):  # one chunk; chunks of 3 and 2 queries
        monkeypatch.setattr(metagradient_chunks, "CHUNK", cap)
        estimator = Metagradient(case.model, task, run)
        sizes.append((estimator.scores(case.query, case.train), estimator._rows))
    (whole, one), (chunked, three) = sizes
    assert (one, three) == (5, 3)
    assert_close(chunked, whole, rtol=0, atol=1e-10, what="chunks of 3 + 2 vs one chunk")


def test_chunks_shrink_with_the_activations_and_give_the_same_scores(monkeypatch):
    """The chunk holds its temporaries (the layer pass's: 0.8 forward passes' tensors +
    4 P floats per query) and the adjoints within 4.5x the queries' adjoints of θ: a CNN, whose batch activations dwarf P, gets smaller chunks than an MLP; a budget of
    one query per chunk gives the same scores."""
    rows = []
    pick = Metagradient._chunk_rows
    monkeypatch.setattr(
        Metagradient, "_chunk_rows", lambda self, *a: rows.append(pick(self, *a)) or rows[-1]
    )
    for make in (mlp, cnn):
        case = make(n_train=20, n_query=30)
        task, run = record(case, "sgd")
        whole = Metagradient(case.model, task, run).scores(case.query, case.train)
    assert 1 < rows[1] < rows[0] < 30, rows
    monkeypatch.setattr(metagradient_chunks, "TEMPORARIES", 1e-9)
    monkeypatch.setattr(metagradient_chunks, "LIMIT", 0)
    single = Metagradient(case.model, task, run).scores(case.query, case.train)
    assert rows[-1] == 1
    assert_close(single, whole, rtol=0, atol=1e-10, what="one query per chunk vs the rule's")


def test_sign_removing_top_proponent_raises_query_loss():
    case = mlp(n_train=20, n_query=3)
    task, run = record(case, "sgd", clip=False)
    scores = Metagradient(case.model, task, run).scores(case.query, case.train)
    base = measured(case, task, run, torch.ones(20, dtype=torch.float64))
    for q in range(3):
        weights = torch.ones(20, dtype=torch.float64)
        weights[int(scores[q].argmax())] = 0
        assert measured(case, task, run, weights)[q] > base[q]


@pytest.mark.parametrize("normalization", ["mean", "n"])
def test_hessian_free_is_exact_for_a_single_step(normalization):
    case = mlp(n_train=20, n_query=3)
    task, run = record(case, "sgd", epochs=1, batch=20, clip=False)  # one step: no H_t term used
    args = (case.query, case.train)
    exact = Metagradient(case.model, task, run, normalization=normalization).scores(*args)
    free = Metagradient(
        case.model, task, run, normalization=normalization, hessian_free=True
    ).scores(*args)
    assert_close(free, exact, rtol=0, atol=1e-10 * float(exact.abs().max()), what="one step")


def test_mean_normalization_replays_the_loop_without_the_dropped_examples():
    case = mlp(n_train=20, n_query=3)
    start = {k: v.clone() for k, v in case.model.state_dict().items()}
    task, run = record(case, "adam", clip=False)
    keep = torch.ones(20, dtype=torch.float64)
    keep[[1, 4, 9, 15]] = 0
    case.model.load_state_dict(start)  # the loop again, each batch without the dropped examples
    opt = OPTIMIZERS["adam"](case.model.parameters())
    sched = torch.optim.lr_scheduler.LinearLR(opt, 0.3, 1.0, total_iters=4)
    x, y = case.train
    for idx in run.batches:
        kept = idx[keep[idx] > 0]
        opt.zero_grad()
        task.train_loss(case.model, (x[kept], y[kept])).mean().backward()
        opt.step()
        sched.step()
    params = replay(case.model, task, case.train, run, weights=keep)
    for name, p in case.model.named_parameters():
        assert_close(params[name], p.detach(), rtol=1e-12, atol=1e-12, what=name)
    shrunk = replay(case.model, task, case.train, run, weights=keep, normalization="n")
    assert not torch.allclose(shrunk["0.weight"], params["0.weight"], atol=1e-4)


def test_hessian_free_differs_and_is_cheaper_path():
    case = mlp(n_train=20, n_query=3)
    task, run = record(case, "sgd", clip=False)
    exact = Metagradient(case.model, task, run).scores(case.query, case.train)
    free = Metagradient(case.model, task, run, hessian_free=True).scores(case.query, case.train)
    assert not torch.allclose(exact, free, rtol=1e-3)
    assert torch.corrcoef(torch.stack([exact.flatten(), free.flatten()]))[0, 1] > 0.5


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_recorder_round_trip_and_replay_are_bit_identical(tmp_path, optimizer):
    case = mlp(n_train=20, n_query=3)
    task, run = record(case, optimizer, every=5)
    run.save(tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    assert (
        loaded.settings() == run.settings()
        and loaded.lrs == run.lrs
        and loaded.max_norms == run.max_norms
    )
    assert all(torch.equal(a, b) for a, b in zip(loaded.batches, run.batches, strict=True))
    for a, b in zip(loaded.checkpoints, run.checkpoints, strict=True):
        assert a.step == b.step and a.count == b.count and torch.equal(a.theta, b.theta)
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
    final = replay(case.model, task, case.train, loaded)
    for name, p in case.model.named_parameters():
        assert torch.equal(final[name], p.detach()), name
    assert math.isclose(
        run.lrs[0], 0.3 * OPTIMIZERS[optimizer](case.model.parameters()).defaults["lr"]
    )


@pytest.mark.parametrize("optimizer", ["sgd", "sgd_heavy_ball", "adam"])
def test_a_cycled_momentum_is_recorded_replayed_and_differentiated(tmp_path, optimizer):
    """OneCycleLR cycles SGD's momentum (Adam's beta1) with the learning rate by default: the
    recorder keeps each step's value, the replay and the reverse pass use it."""
    case = mlp(n_train=20, n_query=3)
    task = ClassificationTask(measurement=case.task.measure)
    x, y = case.train
    opt = OPTIMIZERS[optimizer](case.model.parameters())
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.2, total_steps=9)
    rec = Recorder(case.model, opt, n_train=20, checkpoint_every=4)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for idx in torch.randperm(20, generator=gen).split(7):
            opt.zero_grad()
            task.train_loss(case.model, (x[idx], y[idx])).mean().backward()
            rec.step(idx)
            sched.step()
    run = rec.finish(tmp_path / "run")
    name = "betas" if optimizer == "adam" else "momentum"
    assert list(run.varying) == [name] and len(set(run.varying[name])) > 3
    loaded = load_run(tmp_path / "run")
    assert loaded.varying == run.varying and loaded.hyper == run.hyper
    final = replay(case.model, task, case.train, loaded)
    for key, p in case.model.named_parameters():
        assert torch.equal(final[key], p.detach()), key
    hyper = Metagradient(case.model, task, loaded).hypergradients(case.query, case.train)
    cols = [0, 4, 9, 13, 18]
    fd = finite_differences(case, task, loaded, cols)
    assert fd.abs().max() > 1e-4
    assert_close(hyper[:, cols], fd, rtol=1e-5, atol=1e-5 * float(fd.abs().max()), what="dm/dw")
    frozen = dataclasses.replace(loaded, varying={})  # the first step's momentum throughout
    other = Metagradient(case.model, task, frozen, store=None)
    with pytest.raises(ValueError, match="does not reach"):
        other.hypergradients(case.query, case.train)


def test_a_momentum_that_starts_or_stops_or_a_nesterov_switch_is_refused():
    case = mlp(n_train=20, n_query=3)
    task = ClassificationTask()
    x, y = case.train
    for change in ({"momentum": 0.0}, {"nesterov": False}):
        opt = OPTIMIZERS["sgd"](case.model.parameters())
        rec = Recorder(case.model, opt, n_train=20)
        for step in range(2):
            opt.zero_grad()
            task.train_loss(case.model, (x[:5], y[:5])).mean().backward()
            if step == 1:
                opt.param_groups[0].update(change)
                with pytest.raises(ValueError, match=f"optimizer: {next(iter(change))}"):
                    rec.step(range(5))
            else:
                rec.step(range(5))


def _user_loop(model, noise: float = 0.0):
    """A user's SGD loop on a 6x6 image task, recorded; ``noise``: Gaussian input augmentation."""
    torch.manual_seed(0)
    x, y = torch.randn(40, 1, 6, 6), torch.randint(0, 3, (40,))
    task, opt = ClassificationTask(), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = Recorder(model, opt, n_train=40, checkpoint_every=4)
    for _ in range(2):
        for idx in torch.randperm(40).split(10):
            opt.zero_grad()
            batch = x[idx] + noise * torch.randn_like(x[idx])
            task.train_loss(model, (batch, y[idx])).mean().backward()
            rec.step(idx)
    return task, (x, y), rec.finish()


def _conv_bn() -> torch.nn.Module:
    torch.manual_seed(1)
    nn = torch.nn
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(64, 3)
    )


def _mlp_dropout() -> torch.nn.Module:
    torch.manual_seed(1)
    nn = torch.nn
    return nn.Sequential(
        nn.Flatten(), nn.Linear(36, 16), nn.Tanh(), nn.Dropout(0.1), nn.Linear(16, 3)
    )


def test_a_loop_that_was_not_deterministic_is_refused_not_differentiated():
    """Replays of a loop with random input noise would be of another run: replay, the
    metagradient and its ground truth raise one ValueError naming the run, instead of
    returning numbers."""
    model = _mlp_dropout().eval()
    task, train, run = _user_loop(model, 0.1)
    assert not run.rng  # the noise is drawn outside the model's forward pass
    query = (train[0][:2], train[1][:2])
    with pytest.raises(ValueError, match=r"run: replaying steps 0-4 .* not deterministic"):
        replay(model, task, train, run)
    with pytest.raises(ValueError, match=r"run: replaying steps 4-8 .* not deterministic"):
        Metagradient(model, task, run).scores(query, train)
    with pytest.raises(ValueError, match=r"run: replaying steps 0-4 .* not deterministic"):
        Metagradient(model, task, run).hypergradients(query, train, weights=torch.rand(40))
    with pytest.raises(ValueError, match="not deterministic"):
        single_model_ground_truth(model, task, train, query, run, fraction=0.1, n_subsets=2)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_dropout_in_train_mode_replays_its_masks_and_equals_finite_differences(optimizer):
    """Dropout in train mode: the recorder keeps torch's random state at each step's forward
    pass (the loop's own draws between steps, e.g. a shuffle, do not matter), the replay
    reproduces the run bit for bit and the metagradient, with the run's masks, equals finite
    differences of retraining; the user's random state is left as it was."""
    torch.manual_seed(2)
    nn = torch.nn
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(25, 12), nn.Tanh(), nn.Dropout(0.3), nn.Linear(12, 3)
    ).double()
    case = _bn_case(0.1)
    case.model = model
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task, run = record(case, optimizer)
    assert run.modes == ("", "0", "1", "2", "3", "4") and len(run.rng) == run.num_steps
    state = torch.get_rng_state()
    final = replay(model, task, case.train, run)
    assert all(torch.equal(final[k], p.detach()) for k, p in model.named_parameters())
    unmasked = dataclasses.replace(run, rng={})  # the masks matter
    with pytest.raises(ValueError, match="not deterministic"):
        replay(model, task, case.train, unmasked)
    model.eval()
    hyper = Metagradient(model, task, run).hypergradients(case.query, case.train)
    assert torch.equal(torch.get_rng_state(), state)
    cols = [0, 5, 11, 19]
    fd = finite_differences(case, task, run, cols)
    assert fd.abs().max() > 1e-3
    assert_close(hyper[:, cols], fd, rtol=1e-5, atol=1e-5 * float(fd.abs().max()), what="dm/dw")
    with pytest.raises(ValueError, match="hessian_free"):
        Metagradient(model, task, run, hessian_free=True)


def test_a_dropout_run_round_trips_and_replays_each_steps_modes(tmp_path):
    """The random states go to the store and come back; a loop whose model is in eval mode
    for its first steps (no random numbers drawn) and in train mode after replays so; a mode
    changed between steps that draw random numbers is refused at the step."""
    model = _mlp_dropout()
    torch.manual_seed(0)
    x, y = torch.randn(40, 1, 6, 6), torch.randint(0, 3, (40,))
    task, opt = ClassificationTask(), torch.optim.Adam(model.parameters(), lr=0.01)
    rec = Recorder(model, opt, n_train=40, checkpoint_every=3)
    for step, idx in enumerate(torch.randperm(40).split(5)):
        model.train(step >= 3)
        opt.zero_grad()
        task.train_loss(model, (x[idx], y[idx])).mean().backward()
        rec.step(idx)
    run = rec.finish()
    assert sorted(run.rng) == list(range(3, 8)) and "3" in run.modes
    run.save(tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    assert loaded.settings() == run.settings() and loaded.modes == run.modes
    assert all(torch.equal(loaded.rng[t], run.rng[t]) for t in run.rng)
    final = replay(model, task, (x, y), loaded)
    assert all(torch.equal(final[k], p.detach()) for k, p in model.named_parameters())
    shuffled = _mlp_dropout()  # each epoch's shuffle draws from the same random state
    task, train, run = _user_loop(shuffled)
    final = replay(shuffled, task, train, run)
    assert all(torch.equal(final[k], p.detach()) for k, p in shuffled.named_parameters())
    rec = Recorder(model, opt, n_train=40)
    model[1].register_forward_hook(lambda m, a, out: out + 0 * torch.rand_like(out))
    for step in range(2):
        model.train()
        model[3].train(step == 0)  # the dropout off, but a hook still draws random numbers
        opt.zero_grad()
        task.train_loss(model, (x[:5], y[:5])).mean().backward()
        if step == 0:
            rec.step(torch.arange(5))
        else:
            with pytest.raises(ValueError, match="model: the train/eval mode of '3' changed"):
                rec.step(torch.arange(5))


def _bn_case(momentum: float | None):
    """A tanh CNN with a BatchNorm after its convolution, float64, on 5x5 images."""
    torch.manual_seed(2)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3, momentum=momentum),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(27, 3),
    ).double()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 1, 5, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (24,), generator=g)
    return SimpleNamespace(
        model=model,
        task=ClassificationTask(measurement="margin"),
        train=(x[:20], y[:20]),
        query=(x[20:], y[20:]),
    )


@pytest.mark.parametrize(
    ("optimizer", "momentum"), [("sgd", 0.1), ("adam", 0.3), ("sgd_heavy_ball", None)]
)
def test_batchnorm_in_train_mode_replays_and_equals_finite_differences(optimizer, momentum):
    """A BatchNorm trained in train mode (batch statistics, running statistics moved at every
    step, read by the trained model in eval mode): no warning, the replay reproduces the
    parameters and the running statistics bit for bit, and the metagradient, through the
    weighted batch statistics and the running statistics, equals finite differences of
    retraining with the weights perturbed."""
    case = _bn_case(momentum)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        task, run = record(case, optimizer)
    assert run.norms == ("1",) and case.model.training
    final = replay(case.model, task, case.train, run)
    own = case.model.state_dict()
    assert set(final) == set(own) and all(torch.equal(final[k], own[k]) for k in own)
    case.model.eval()  # the user's trained model, as evaluated

    hyper = Metagradient(case.model, task, run).hypergradients(case.query, case.train)
    cols = [0, 4, 9, 13, 18]
    fd = finite_differences(case, task, run, cols)
    assert fd.abs().max() > 1e-3
    assert_close(hyper[:, cols], fd, rtol=1e-5, atol=1e-5 * float(fd.abs().max()), what="dm/dw")

    # the running statistics are part of the derivative: without their path it is off
    kept = torch.ones(20, dtype=torch.float64)
    kept[[2, 7]] = 0
    at = Metagradient(case.model, task, run).hypergradients(case.query, case.train, weights=kept)
    fd_at = finite_differences(case, task, run, [4], kept)[:, 0]
    assert_close(at[:, 4], fd_at, rtol=1e-5, atol=1e-5 * float(fd_at.abs().max()), what="at w")


def test_a_batchnorm_run_round_trips_and_its_ground_truth_uses_the_running_statistics(tmp_path):
    case = _bn_case(0.1)
    task, run = record(case, "adam")
    run.save(tmp_path / "run")
    loaded = load_run(tmp_path / "run")
    assert loaded.norms == ("1",) and loaded.settings() == run.settings()
    for a, b in zip(run.checkpoints, loaded.checkpoints, strict=True):
        assert (
            a.buffers.keys()
            == b.buffers.keys()
            == {
                "1.running_mean",
                "1.running_var",
                "1.num_batches_tracked",
            }
        )
        assert all(torch.equal(a.buffers[k], b.buffers[k]) for k in a.buffers)
    case.model.eval()
    truth = single_model_ground_truth(
        case.model, task, case.train, case.query, loaded, fraction=0.1, n_subsets=2
    )
    for j in range(2):
        expect = measured(case, task, run, truth.masks[j].double())
        assert_close(truth.actual[j], expect, rtol=0, atol=0, what="ground truth")
    with pytest.raises(ValueError, match="hessian_free"):
        Metagradient(case.model, task, run, hessian_free=True)
    switched = _bn_case(0.1)
    opt = torch.optim.SGD(switched.model.parameters(), lr=0.1)
    rec = Recorder(switched.model, opt, n_train=20)
    x, y = switched.train
    for step in range(2):
        switched.model.train(step == 0)
        opt.zero_grad()
        task.train_loss(switched.model, (x[:8], y[:8])).mean().backward()
        if step == 0:
            rec.step(torch.arange(8))
        else:
            with pytest.raises(
                ValueError, match="model: its BatchNorm layers in train mode changed"
            ):
                rec.step(torch.arange(8))


def test_check_reached_tolerates_rounding_and_refuses_a_miss_or_nan():
    start = Checkpoint(0, torch.zeros(4), {})
    end = Checkpoint(5, torch.tensor([1.0, 0.0, 0.0, 0.0]), {})
    check_reached(start, end, end.theta + 1e-4)  # 2e-4 of the change: rounding
    for theta in (end.theta + 1e-2, torch.full((4,), math.nan)):
        with pytest.raises(ValueError, match="run: replaying steps 0-5 does not reach"):
            check_reached(start, end, theta)


def test_the_same_batchnorm_loop_in_eval_mode_replays_and_differentiates():
    model = _conv_bn().eval()
    task, train, run = _user_loop(model)
    final = replay(model, task, train, run)
    assert all(torch.equal(final[k], p.detach()) for k, p in model.named_parameters())
    prefix = run.layout.flatten(replay(model, task, train, run, steps=4))
    assert run.checkpoints[1].step == 4 and torch.equal(prefix, run.checkpoints[1].theta)
    scores = Metagradient(model, task, run).scores((train[0][:2], train[1][:2]), train)
    assert scores.shape == (2, 40) and torch.isfinite(scores).all()
    with pytest.raises(ValueError, match="steps"):
        replay(model, task, train, run, steps=0)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_a_batchnorm_cnn_trained_from_a_dataloader_records_replays_and_scores(mode):
    """A user's loop over a shuffling DataLoader of a Dataset (BatchNorm in train mode, as
    users train, or eval mode): the indices come from with_indices, the run replays bit for
    bit on the Dataset itself (running statistics too) and scores the same as on its
    tensors."""
    model = _conv_bn().train(mode == "train")
    torch.manual_seed(0)
    x, y = torch.randn(40, 1, 6, 6), torch.randint(0, 3, (40,))
    train_set = torch.utils.data.TensorDataset(x, y)
    loader = torch.utils.data.DataLoader(
        with_indices(train_set),
        batch_size=8,
        shuffle=True,
        generator=torch.Generator().manual_seed(3),
    )
    task, opt = ClassificationTask(), torch.optim.Adam(model.parameters(), lr=0.01)
    rec = Recorder(model, opt, n_train=len(train_set), checkpoint_every=4)
    for _ in range(2):
        for (xb, yb), idx in loader:
            assert torch.equal(xb, x[idx])
            opt.zero_grad()
            task.train_loss(model, (xb, yb)).mean().backward()
            rec.step(idx)
    run = rec.finish()
    assert sorted(torch.cat(run.batches[:5]).tolist()) == list(
        range(40)
    )  # one epoch: a permutation
    assert len(run.norms) == (1 if mode == "train" else 0)
    final = replay(model, task, train_set, run)
    state = model.state_dict()
    assert set(final) == {k for k, _ in model.named_parameters()} | {
        f"{n}.{s}"
        for n in run.norms
        for s in ("running_mean", "running_var", "num_batches_tracked")
    }
    assert all(torch.equal(final[k], state[k]) for k in final)
    model.eval()
    query = (x[:3], y[:3])
    on_dataset = Metagradient(model, task, run).scores(query, train_set)
    assert_close(on_dataset, Metagradient(model, task, run).scores(query, (x, y)), rtol=0, atol=0)
    if mode == "train":
        # the conv's bias, which the BatchNorm cancels, walks by Adam-scaled rounding noise
        # (the check skips it) and its a_g is 0: float32 agrees with float64
        assert Metagradient(model, task, run).cancelled(train_set) == [slice(36, 40)]
        exact = Metagradient(model, task, run, dtype=torch.float64).scores(query, train_set)
        assert float((on_dataset.double() - exact).norm() / exact.norm()) < 1e-4  # 0.016 if not
    with pytest.raises(TypeError, match="dataset"):
        with_indices(iter(train_set))


def test_bad_input_is_refused():
    case = mlp(n_train=20, n_query=3)
    task, run = record(case, "sgd")
    with pytest.raises(TypeError, match="run"):
        Metagradient(case.model, task, object())
    with pytest.raises(ValueError, match="weight_decay"):
        Metagradient(case.model, ClassificationTask(weight_decay=0.1), run)
    with pytest.raises(ValueError, match="train"):
        Metagradient(case.model, task, run).scores(
            case.query, (case.train[0][:10], case.train[1][:10])
        )
    with pytest.raises(ValueError, match="query_block"):
        Metagradient(case.model, task, run, query_block=0)
    with pytest.raises(ValueError, match="normalization"):
        Metagradient(case.model, task, run, normalization="sum")
    ones = torch.ones(20)
    bad = [ones[:10], ones * math.nan, -ones, [1.0] * 20]
    for weights, error in zip(bad, [ValueError] * 3 + [TypeError], strict=True):
        with pytest.raises(error, match="weights"):
            Metagradient(case.model, task, run).hypergradients(
                case.query, case.train, weights=weights
            )
        with pytest.raises(error, match="weights"):
            replay(case.model, task, case.train, run, weights=weights)
    opt = torch.optim.RMSprop(case.model.parameters())
    with pytest.raises(TypeError, match="optimizer"):
        Recorder(case.model, opt, n_train=20)
    rec = Recorder(case.model, torch.optim.SGD(case.model.parameters(), lr=0.1), n_train=20)
    with pytest.raises(ValueError, match="indices"):
        rec.step([20])
    with pytest.raises(ValueError, match="no step"):
        rec.finish()


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_killed_reverse_pass_resumes_from_the_store_bit_for_bit(optimizer, tmp_path, monkeypatch):
    case = mlp(n_train=20, n_query=3)
    task, run = record(case, optimizer)
    whole = Metagradient(case.model, task, run, query_block=2).scores(case.query, case.train)
    path = tmp_path / "adjoint"
    calls = {"n": 0}
    forward = Metagradient._forward

    def dies_in_the_third_segment(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process is killed mid-pass
        return forward(self, *args)

    monkeypatch.setattr(Metagradient, "_forward", dies_in_the_third_segment)
    with pytest.raises(KeyboardInterrupt):
        Metagradient(case.model, task, run, query_block=2, store=path).scores(
            case.query, case.train
        )
    monkeypatch.setattr(Metagradient, "_forward", forward)
    segments = {"n": 0}

    def counted(self, *args):
        segments["n"] += 1
        return forward(self, *args)

    monkeypatch.setattr(Metagradient, "_forward", counted)
    resumed = Metagradient(case.model, task, run, query_block=2, store=path).scores(
        case.query, case.train
    )
    assert torch.equal(resumed, whole)
    n_segments = len(run.checkpoints) - 1
    assert segments["n"] == 2 * n_segments - 2  # block 0 resumed after its 2 saved segments
    with pytest.raises(StoreMismatchError):
        Metagradient(case.model, task, run, query_block=2, store=path).scores(
            (case.query[0] + 1, case.query[1]), case.train
        )


def test_one_call_api_passes_method_options_and_store(tmp_path):
    """``headwater.influence(method="metagradient", method_options=..., store=...)`` gives the
    class's scores with those options and saves its resumable state; a misspelled option or
    one the API passes itself is refused naming ``method_options`` and the valid ones."""
    import headwater
    from headwater.errors import ConfigError

    case = mlp(n_train=20, n_query=3)
    task, run = record(case, "sgd")
    want = Metagradient(case.model, task, run, normalization="n").scores(case.query, case.train)

    def call(options, **kwargs):
        return headwater.influence(
            case.model,
            case.train,
            case.query,
            task=task,
            method="metagradient",
            run=run,
            method_options=options,
            progress=False,
            **kwargs,
        )

    got = call({"normalization": "n", "query_block": 2}, store=tmp_path / "mg")
    torch.testing.assert_close(got.values, want, rtol=1e-6, atol=1e-7)
    default = Metagradient(case.model, task, run).scores(case.query, case.train)
    assert (default - want).abs().max() > 1e-3 * want.abs().max()  # the option took effect
    assert sorted(p.name for p in tmp_path.iterdir() if "block" in p.name)  # saved by segment
    for bad, named in (({"normalisation": "n"}, "normalization"), ({"store": "x"}, "hessian_free")):
        with pytest.raises(ConfigError, match=f"method_options.*{named}"):
            call(bad)
    with pytest.raises(ValueError, match="method_options: not used by method='influence'"):
        headwater.influence(
            case.model, case.train, case.query, method_options={"normalization": "n"}
        )
