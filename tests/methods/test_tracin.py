"""TracIn against real (re)training: a gradient-descent step's removal effect, the sign, invariances."""

import copy

import numpy as np
import pytest
import torch
from cases import CASES, OutsideUse, digits
from oracles import assert_close, loop_gradients
from torch import nn

import headwater
from headwater.evaluate import measure
from headwater.methods.tracin import Checkpoint, TracIn, run_checkpoints
from headwater.task import ClassificationTask
from headwater.train.recorder import Recorder


def _gd(
    model: nn.Module, task, data, weights: torch.Tensor, lr: float, steps: int
) -> list[Checkpoint]:
    """Full-batch gradient descent on Σ w_i ℓ_i + wd/2‖θ‖², recording a checkpoint per step."""
    x, y = data
    params = list(model.parameters())
    ckpts = []
    for _ in range(steps):
        ckpts.append(
            Checkpoint({k: v.detach().clone() for k, v in model.state_dict().items()}, lr, 1)
        )
        loss = (weights * task.train_loss(model, (x, y))).sum()
        loss = loss + 0.5 * task.weight_decay * sum(p.pow(2).sum() for p in params)
        grads = torch.autograd.grad(loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p -= lr * g
    return ckpts


def test_one_step_removal_effect_is_exact_to_first_order():
    case = CASES["mlp"]()
    n = case.train[0].shape[0]
    start = copy.deepcopy(case.model)
    ckpts = _gd(
        copy.deepcopy(start),
        case.task,
        case.train,
        torch.full((n,), 1.0 / n, dtype=torch.float64),
        lr=1e-4,
        steps=1,
    )
    scores = TracIn(start, case.task, ckpts).scores(case.query, case.train)
    g_tr = loop_gradients(start, case.task, case.train)
    g_q = loop_gradients(start, case.task, case.query, measurement=True)
    assert_close(scores, 1e-4 * g_q @ g_tr.T, rtol=1e-9, what="TracIn vs lr * g_q . g_i")

    full = copy.deepcopy(start)
    _gd(full, case.task, case.train, torch.full((n,), 1.0 / n, dtype=torch.float64), 1e-4, 1)
    base = measure(full, case.task, case.query)
    for i in (0, 5, 11):
        w = torch.full((n,), 1.0 / n, dtype=torch.float64)
        w[i] = 0.0
        removed = copy.deepcopy(start)
        _gd(removed, case.task, case.train, w, 1e-4, 1)
        actual = measure(removed, case.task, case.query) - base
        # exact up to the O(lr) change of the query gradient within the step
        assert_close(actual, scores[:, i] / n, rtol=1e-3, atol=1e-12, what=f"removal of {i}")


LR, STEPS = 0.05, 10


def test_tracks_retraining_over_a_trajectory():
    """Gradient descent on digits logistic regression: TracIn/n predicts the actual effect
    of removing an example from the whole run while lr·steps·λ_max stays small (TracIn
    drops the propagation of early changes through later steps, which HYDRA keeps)."""
    xtr, ytr, xte, yte = digits(200, 10)
    task = ClassificationTask(weight_decay=1e-3)
    torch.manual_seed(0)
    start = nn.Linear(64, 10).double()
    n = 200
    full_w = torch.full((n,), 1.0 / n, dtype=torch.float64)
    trained = copy.deepcopy(start)
    ckpts = _gd(trained, task, (xtr, ytr), full_w, lr=LR, steps=STEPS)
    scores = TracIn(start, task, ckpts).scores((xte, yte), (xtr, ytr))
    base = measure(trained, task, (xte, yte))
    removed_idx = list(range(0, 200, 10))
    actual = []
    for i in removed_idx:
        w = full_w.clone()
        w[i] = 0
        m = copy.deepcopy(start)
        _gd(m, task, (xtr, ytr), w, LR, STEPS)
        actual.append(measure(m, task, (xte, yte)) - base)
    actual = torch.stack(actual, 1)
    predicted = scores[:, removed_idx] / n
    r = np.corrcoef(predicted.flatten().numpy(), actual.flatten().numpy())[0, 1]
    assert r >= 0.95, f"Pearson = {r:.3f}"
    assert float((actual / predicted).median()) == pytest.approx(1.0, abs=0.3)


def test_renormalize_steps_and_invariance():
    case = CASES["cnn"]()
    state = {k: v.clone() for k, v in case.model.state_dict().items()}
    ckpts = [Checkpoint(state, 0.1, 3), Checkpoint(state, 0.05, 2)]
    est = TracIn(case.model, case.task, ckpts, chunk_size=3, query_chunk=2)
    g_tr = loop_gradients(case.model, case.task, case.train)
    g_q = loop_gradients(case.model, case.task, case.query, measurement=True)
    assert_close(est.scores(case.query, case.train), 0.4 * g_q @ g_tr.T, rtol=1e-9, what="weights")
    renorm = TracIn(case.model, case.task, ckpts, renormalize=True).scores(case.query, case.train)
    cos = (g_q / g_q.norm(dim=1, keepdim=True)) @ (g_tr / g_tr.norm(dim=1, keepdim=True)).T
    assert_close(renorm, 0.4 * cos, rtol=1e-9, what="renormalised")
    assert_close(est.self_influence(case.train), 0.4 * g_tr.pow(2).sum(1), rtol=1e-9)


def test_bad_checkpoints():
    case = CASES["mlp"]()
    with pytest.raises(ValueError, match="checkpoints"):
        TracIn(case.model, case.task, [])
    with pytest.raises(ValueError, match="lr"):
        Checkpoint({}, -1.0)
    bad = Checkpoint({"0.weight": torch.zeros(2, 2)}, 0.1)
    with pytest.raises(ValueError, match="checkpoints"):
        TracIn(case.model, case.task, [bad]).scores(case.query, case.train)


def test_one_call_api():
    import headwater

    case = CASES["mlp"]()
    ckpts = [Checkpoint({k: v.clone() for k, v in case.model.state_dict().items()}, 0.1, 2)]
    scores = headwater.influence(
        case.model,
        case.train,
        case.query,
        task=case.task,
        method="tracin",
        checkpoints=ckpts,
        self_influence=True,
        top_k=3,
    )
    full = TracIn(case.model, case.task, ckpts).scores(case.query, case.train)
    assert torch.equal(scores.indices, full.topk(3, dim=1).indices)
    assert scores.self_influence.shape == (24,) and scores.settings["method"] == "tracin"
    with pytest.raises(ValueError, match="checkpoints"):
        headwater.influence(case.model, case.train, case.query, method="tracin")
    with pytest.raises(ValueError, match="trajectory"):
        headwater.influence(case.model, case.train, case.query, method="hydra")


def _lm_linear():
    from cases import causal_lm

    from headwater.task import LanguageModelingTask

    case = causal_lm()
    case.task = LanguageModelingTask(weight_decay=1e-2, modules=["q", "k", "v", "o", "mlp", "head"])
    return case


@pytest.mark.parametrize("make", [CASES["mlp"], CASES["cnn"], _lm_linear], ids=["mlp", "cnn", "lm"])
@pytest.mark.parametrize("renormalize", [False, True])
def test_layerwise_products_equal_per_example_gradients(make, renormalize):
    """Layer by layer (outer products for one-position layers, G for convolutions and token
    sequences) gives the dot products of the full per-example gradients."""
    case = make()
    g = torch.Generator().manual_seed(5)
    states = [
        {
            k: v.clone() + 0.1 * i * torch.randn(v.shape, generator=g, dtype=v.dtype)
            for k, v in case.model.state_dict().items()
        }
        for i in range(2)
    ]
    ckpts = [Checkpoint(states[0], 0.1, 3), Checkpoint(states[1], 0.05, 1)]
    kw = dict(renormalize=renormalize, chunk_size=3)
    layers = TracIn(case.model, case.task, ckpts, gradients="layers", **kw)
    want, want_self = 0.0, 0.0
    for c, state in zip(ckpts, states, strict=True):  # each checkpoint's own gradients
        model = copy.deepcopy(case.model)
        model.load_state_dict(state)
        g_tr = loop_gradients(model, case.task, case.train)
        g_q = loop_gradients(model, case.task, case.query, measurement=True)
        if renormalize:
            g_tr, g_q = g_tr / g_tr.norm(dim=1, keepdim=True), g_q / g_q.norm(dim=1, keepdim=True)
        want = want + c.weight * g_q @ g_tr.T
        want_self = want_self + c.weight * g_tr.pow(2).sum(1)
    assert_close(
        layers.scores(case.query, case.train),
        want,
        rtol=1e-9,
        atol=1e-12 * float(want.abs().max()),
        what="layer-wise scores",
    )
    assert_close(layers.self_influence(case.train), want_self, rtol=1e-9, what="self-influence")
    vmapped = TracIn(case.model, case.task, ckpts, gradients="vmap", **kw).scores(
        case.query, case.train
    )
    assert_close(vmapped, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()), what="vmap scores")


def test_embeddings_and_position_embeddings_take_the_layer_path():
    """Token embeddings are layers; the position embedding (called on ``arange(T)``, no
    batch dimension) and anything else outside a layer come from vmap: same numbers."""
    from cases import causal_lm

    case = causal_lm()
    ckpts = [Checkpoint({k: v.clone() for k, v in case.model.state_dict().items()}, 0.1)]
    g_tr = loop_gradients(case.model, case.task, case.train)
    g_q = loop_gradients(case.model, case.task, case.query, measurement=True)
    for gradients in ("auto", "layers"):
        got = TracIn(case.model, case.task, ckpts, gradients=gradients).scores(
            case.query, case.train
        )
        assert_close(got, 0.1 * g_q @ g_tr.T, rtol=1e-9, what=gradients)
    with pytest.raises(ValueError, match="gradients"):
        TracIn(case.model, case.task, ckpts, gradients="loop")


@pytest.mark.parametrize("model", ["tied", "outside"])
def test_layer_path_is_not_used_where_it_would_miss_a_use(model):
    """Tied weights (their gradient then comes from vmap in the diagonal block), or a
    parameter used outside its module (``"auto"`` falls back to vmap, ``"layers"``
    refuses): exact either way."""
    from cases import causal_lm

    if model == "tied":  # two supported layers share one weight
        case = causal_lm()
        case.model.k.weight = case.model.q.weight
        case.task.modules = ("q", "k", "v", "o", "mlp", "head")
    else:
        case = CASES["mlp"]()
        torch.manual_seed(0)
        case.model = OutsideUse().double()
    ckpts = [Checkpoint({k: v.clone() for k, v in case.model.state_dict().items()}, 0.1)]
    g_tr = loop_gradients(case.model, case.task, case.train)
    g_q = loop_gradients(case.model, case.task, case.query, measurement=True)
    auto = TracIn(case.model, case.task, ckpts)
    assert_close(auto.scores(case.query, case.train), 0.1 * g_q @ g_tr.T, rtol=1e-9)
    assert_close(auto.self_influence(case.train), 0.1 * g_tr.pow(2).sum(1), rtol=1e-9)
    layers = TracIn(case.model, case.task, ckpts, gradients="layers")
    if model == "tied":
        assert_close(layers.scores(case.query, case.train), 0.1 * g_q @ g_tr.T, rtol=1e-9)
    else:
        with pytest.raises(ValueError, match="gradients"):
            layers.scores(case.query, case.train)


def test_renormalized_self_influence_of_a_zero_gradient_is_zero():
    """float32, a training example whose loss has no gradient (up to the rounding of the
    forward pass, which depends on the batch shape and the CPU): 0, not NaN, and not the
    rounding noise lifted to a unit gradient."""
    case = CASES["linreg"]()
    model = case.model.float()
    x, y = case.train[0].float(), case.train[1].float()
    y[0] = (
        model(x[:1]).detach()[0] + 1e-6
    )  # residual 1e-6: a gradient at rounding level, below the floor
    ckpts = [Checkpoint({k: v.clone() for k, v in model.state_dict().items()}, 0.1)]
    for gradients in ("layers", "vmap"):
        est = TracIn(model, case.task, ckpts, renormalize=True, gradients=gradients)
        si = est.self_influence((x, y))
        assert torch.isfinite(si).all() and float(si[0]) == 0.0, (gradients, si[:3])
        assert_close(si[1:], torch.full_like(si[1:], 0.1), rtol=1e-5)
        # below the floor (sqrt(eps) * median norm) the example's renormalised gradient is 0:
        # its score column is 0, the others are cosines times the learning rate
        s = est.scores((x, y), (x, y))
        assert (
            torch.isfinite(s).all()
            and float(s[:, 0].abs().max()) == 0.0
            and float(s[0].abs().max()) == 0.0
        )
        assert_close(s[1:, 1:].diagonal(), torch.full((len(x) - 1,), 0.1), rtol=1e-5)
        assert float(s[1:, 1:].abs().max()) <= 0.1 * (1 + 1e-5)


@pytest.mark.parametrize("renormalize", [False, True])
def test_fused_self_influence_and_one_layer_check_per_checkpoint(renormalize, monkeypatch):
    """``attribute`` takes the self-influence from the same pass as the scores (equal to the
    separate methods), and the layer-path check runs once per checkpoint, not per call."""
    import headwater.methods.tracin as tracin_module

    case = CASES["mlp"]()
    ckpts = [
        Checkpoint({k: v.clone() for k, v in case.model.state_dict().items()}, 0.1, 2),
        Checkpoint({k: 0.5 * v for k, v in case.model.state_dict().items()}, 0.05),
    ]
    calls = []
    check = tracin_module.layer_blocks
    monkeypatch.setattr(
        tracin_module, "layer_blocks", lambda *args: calls.append(1) or check(*args)
    )
    est = TracIn(case.model, case.task, ckpts, renormalize=renormalize)
    got = est.attribute(case.query, case.train, top_k=3, self_influence=True)
    values, indices, si = got.values, got.indices, got.self_influence
    full = est.scores(case.query, case.train)
    assert torch.equal(indices, full.topk(3, dim=1).indices) and torch.equal(
        values, full.topk(3, dim=1).values
    )
    assert torch.equal(si, est.self_influence(case.train))
    sq = loop_gradients(case.model, case.task, case.train).pow(2).sum(1)
    sq_half = loop_gradients(_scaled(case.model, 0.5), case.task, case.train).pow(2).sum(1)
    if renormalize:  # every gradient is far above the floor: unit length at each checkpoint
        sq, sq_half = torch.ones_like(sq), torch.ones_like(sq_half)
    assert_close(si, 0.2 * sq + 0.05 * sq_half, rtol=1e-9)
    assert len(calls) == len(ckpts)


def _scaled(model: nn.Module, factor: float) -> nn.Module:
    out = copy.deepcopy(model)
    out.load_state_dict({k: factor * v for k, v in model.state_dict().items()})
    return out


def test_checkpoints_of_a_recorded_run():
    """run_checkpoints: every recorded checkpoint after the first, standing for the steps
    since the previous one at their mean learning rate, its state the model's then (with
    the running statistics of a BatchNorm trained in train mode)."""
    xtr, ytr, xte, yte = digits(60, 5)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(64, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 10)
    ).double()
    task = ClassificationTask()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sched = torch.optim.lr_scheduler.LinearLR(opt, 0.5, 1.0, total_iters=4)
    rec = Recorder(model, opt, n_train=60, checkpoint_every=2)
    states, lrs = [], []
    for step in range(4):
        idx = torch.arange(15 * step, 15 * step + 15)
        lrs.append(opt.param_groups[0]["lr"])
        opt.zero_grad()
        task.train_loss(model, (xtr[idx], ytr[idx])).mean().backward()
        rec.step(idx)
        sched.step()
        if step % 2 == 1:
            states.append(copy.deepcopy(model.state_dict()))
    run = rec.finish()
    ckpts = run_checkpoints(run)
    assert [c.steps for c in ckpts] == [2, 2]
    assert [c.lr for c in ckpts] == pytest.approx([sum(lrs[:2]) / 2, sum(lrs[2:]) / 2])
    for c, state in zip(ckpts, states, strict=True):
        assert c.state.keys() == state.keys()
        assert all(torch.equal(c.state[k], state[k]) for k in state)
    scores = TracIn(model.eval(), task, ckpts).scores((xte, yte), (xtr, ytr))
    assert scores.shape == (5, 60) and torch.isfinite(scores).all()
    found = headwater.influence(model, (xtr, ytr), (xte, yte), task=task, method="tracin", run=run)
    assert_close(found.values, scores, rtol=0, atol=0, what="the one-call API with run=")
