"""The metagradient's products written out by layer (methods/metagradient_layers.py) against
autograd's reverse over reverse, on every supported layer; which models take the generic
path; a whole metagradient with and without them."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, vjp

from headwater.methods.metagradient import Metagradient
from headwater.methods.metagradient_layers import Stack, Unsupported, stack
from headwater.task import ClassificationTask, RegressionTask
from headwater.train.recorder import Recorder
from headwater.train.steps import batch_objective


def _lenet() -> nn.Module:  # odd map sizes: a 3x3 map pooled by torch's own kernel
    return nn.Sequential(
        nn.Unflatten(1, (1, 6, 6)),
        nn.Conv2d(1, 3, 3, padding=1),
        nn.ReLU(),
        nn.AvgPool2d(2),
        nn.Conv2d(3, 4, 3, padding=1),
        nn.Sigmoid(),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.Tanh(),
        nn.Dropout(0.2),
        nn.Linear(5, 3),
    )


def _strided() -> nn.Module:  # stride, dilation, no biases, a nested Sequential
    return nn.Sequential(
        nn.Unflatten(1, (1, 6, 6)),
        nn.Conv2d(1, 2, 3, stride=2, padding=2, bias=False),
        nn.Tanh(),
        nn.Conv2d(2, 3, 2, dilation=2),
        nn.Flatten(),
        nn.Sequential(nn.Linear(12, 4), nn.Identity(), nn.Tanh()),
        nn.Linear(4, 3, bias=False),
    )


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(36, 8), nn.Tanh(), nn.Linear(8, 3))


def _wide() -> nn.Module:  # a wide patch on the whole map, no pool: the first layer is no head
    return nn.Sequential(
        nn.Unflatten(1, (1, 6, 6)),
        nn.Conv2d(1, 2, 5, padding=2),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(72, 3),
    )


MODELS = {"lenet": _lenet, "strided": _strided, "mlp": _mlp, "wide": _wide}
HEADS = {"lenet": (1, 3), "strided": (1, 2), "mlp": None, "wide": None}


def _problem(build, task, seed: int = 0):
    torch.manual_seed(seed)
    model = build().double().eval()
    x = torch.randn(7, 36, dtype=torch.float64)
    if isinstance(task, RegressionTask):
        model = nn.Sequential(*model[:-1], nn.Linear(model[-1].in_features, 2)).double().eval()
        y = torch.randn(7, 2, dtype=torch.float64)
    else:
        y = torch.randint(0, 3, (7,))
    return model, x, y


def _autograd_products(model, task, params, x, y, w, normalization, vectors):
    """Reverse over reverse, written here: the pullback of the batch gradient g(θ, w)."""

    def gradient(p, weights):
        def objective(q):
            losses = task.loss(functional_call(model, q, (x,)), y)
            return batch_objective(weights, losses, normalization)

        return grad(objective)(p)

    g, pullback = vjp(gradient, params, w)
    hv, jw = {}, []
    c = next(iter(vectors.values())).shape[0]
    for i in range(c):
        h, dw = pullback({k: v[i] for k, v in vectors.items()})
        for k, t in h.items():
            hv.setdefault(k, []).append(t)
        jw.append(dw)
    return g, {k: torch.stack(t) for k, t in hv.items()}, torch.stack(jw)


@pytest.mark.parametrize("arch", list(MODELS))
@pytest.mark.parametrize(
    ("task", "normalization", "weights"),
    [
        (ClassificationTask(), "mean", "mixed"),
        (ClassificationTask(), "n", "mixed"),
        (ClassificationTask(), "mean", "zero"),  # a batch whose weights sum to 0
        (RegressionTask(), "mean", "ones"),
    ],
)
def test_layer_products_equal_reverse_over_reverse(arch, task, normalization, weights):
    model, x, y = _problem(MODELS[arch], task)
    params = {k: v.detach() for k, v in model.named_parameters()}
    w = {
        "mixed": torch.tensor([1.0, 0.0, 0.5, 1.0, 2.0, 1.0, 0.0], dtype=torch.float64),
        "zero": torch.zeros(7, dtype=torch.float64),
        "ones": torch.ones(7, dtype=torch.float64),
    }[weights]
    layers = stack(model, list(params), task)
    assert layers is not None
    gen = torch.Generator().manual_seed(1)
    vectors = {k: torch.randn(3, *v.shape, generator=gen, dtype=v.dtype) for k, v in params.items()}
    shared = Stack(layers, params, x, y, w, task, normalization)
    assert shared.head == HEADS[arch]
    hv, jw = shared.products(vectors)
    g, hv_ref, jw_ref = _autograd_products(model, task, params, x, y, w, normalization, vectors)
    assert sorted(hv) == sorted(hv_ref) == sorted(shared.grads)
    for k in hv_ref:
        scale = float(hv_ref[k].abs().max()) + 1e-30
        assert float((hv[k] - hv_ref[k]).abs().max()) <= 1e-12 * max(scale, 1.0), k
        assert float((shared.grads[k] - g[k]).abs().max()) <= 1e-13, k
    assert float((jw - jw_ref).abs().max()) <= 1e-12 * max(float(jw_ref.abs().max()), 1.0)
    assert float(jw_ref.abs().max()) > 1e-3
    if weights != "zero":  # (at weights 0 the batch loss, and its Hessian, vanish)
        assert float(hv_ref["1.weight" if arch != "mlp" else "0.weight"].abs().max()) > 1e-3


def test_unsupported_models_and_tasks_take_the_generic_path():
    task = ClassificationTask()

    def names(model):
        return [k for k, _ in model.named_parameters()]

    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(x)

    class OwnOutput(ClassificationTask):
        def output(self, model, inputs):
            return model(inputs) * 2

    refused = [
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(2, 3)),
        Custom(),
        nn.Sequential(nn.Linear(4, 4), nn.ReLU(inplace=True), nn.Linear(4, 3)),
        nn.Sequential(nn.Conv2d(2, 2, 3, groups=2), nn.Flatten(), nn.Linear(2, 3)),
        nn.Sequential(nn.Conv2d(1, 2, 3, padding="same"), nn.Flatten(), nn.Linear(2, 3)),
        nn.Sequential(nn.Conv2d(1, 2, 3), nn.AvgPool2d(2, padding=1), nn.Flatten()),
        nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Linear(4, 3)),
    ]
    for model in refused:
        assert stack(model, names(model), task) is None, model
    model = _mlp()
    assert stack(model, names(model), task) is not None
    assert stack(model, names(model)[2:], task) is None  # a frozen first layer
    assert stack(model, names(model), OwnOutput()) is None


def _per_position() -> nn.Module:  # a Linear on [B, 9, 4]: the layer pass does not apply
    return nn.Sequential(nn.Linear(4, 2), nn.Tanh(), nn.Flatten(), nn.Linear(18, 3))


@pytest.mark.parametrize("hessian_free", [False, True])
@pytest.mark.parametrize(
    ("build", "optimizer"), [(_lenet, "sgd"), (_lenet, "adam"), (_per_position, "sgd")]
)
def test_a_metagradient_with_layer_products_equals_the_generic_one(build, optimizer, hessian_free):
    torch.manual_seed(0)
    model = build().double()
    x = torch.randn(24, 36, dtype=torch.float64)
    if build is _per_position:
        x = x.view(24, 9, 4)
    y = torch.randint(0, 3, (24,))
    task = ClassificationTask()
    opt = (
        torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=1e-3)
        if optimizer == "sgd"
        else torch.optim.Adam(model.parameters(), lr=0.02)
    )
    rec = Recorder(model, opt, n_train=24, checkpoint_every=3)
    model.eval()  # dropout off: the run draws no random numbers
    for _ in range(3):
        for idx in torch.randperm(24).split(6):
            opt.zero_grad()
            task.train_loss(model, (x[idx], y[idx])).mean().backward()
            rec.step(idx)
    run = rec.finish()
    query = (torch.randn(5, *x.shape[1:], dtype=torch.float64), torch.randint(0, 3, (5,)))
    fast = Metagradient(model, task, run, hessian_free=hessian_free)
    assert fast._layers is not None  # by module types
    slow = Metagradient(model, task, run, hessian_free=hessian_free)
    slow._layers = None
    at = torch.ones(24, dtype=torch.float64)
    at[[1, 7]] = 0
    for weights in (None, at):
        a = fast.hypergradients(query, (x, y), weights=weights)
        b = slow.hypergradients(query, (x, y), weights=weights)
        assert float(b.abs().max()) > 1e-3
        assert float((a - b).abs().max()) <= 1e-10 * float(b.abs().max())
    assert (fast._layers is None) == (build is _per_position)  # its tensors: generic path
    if build is _per_position:
        params = {k: v.detach() for k, v in model.named_parameters()}
        with pytest.raises(Unsupported, match="0: input of 3 dimensions"):
            Stack(stack(model, list(params), task), params, x, y, at, task, "mean")
