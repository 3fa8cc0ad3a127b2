"""Deterministic bench problems on scikit-learn's bundled digits (no download).

Data: ``load_digits`` (1,797 8x8 images, 64 features, 10 classes), shuffled with a
fixed seed; the first 1,000 are training examples, the next 200 test examples,
the rest unused. Features are standardised with the *training* mean and std
(constant pixels get std 1). Labels are int64.

Problems (both with objective  mean_i CE(f(x_i), y_i) + (weight_decay/2)*||theta||^2,
the L2 term on every parameter, weights and biases, weight_decay = 1e-3):

- ``logreg()``: nn.Linear(64, 10), trained in float64 with L-BFGS (strong Wolfe)
  until the full gradient norm is < 1e-10 (a Newton polish step is taken if
  L-BFGS stalls above that). Strongly convex: the exact optimum, so the
  influence-function approximations are all well defined.
- ``mlp()``: Linear(64,128)-Tanh-Linear(128,64)-Tanh-Linear(64,10), float32,
  minibatch Adam for a fixed number of epochs from a fixed seed.

Trained weights are cached in ``bench/.cache/`` keyed by a hash of the settings;
training from scratch takes a few seconds.

Shared helpers used by ``bench.reference`` and ``bench.peers``:
``per_example_loss``, ``margin``, ``measurement``, ``regulariser``,
``objective``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Problem",
    "cached",
    "digits_split",
    "get_problem",
    "logreg",
    "margin",
    "measurement",
    "mlp",
    "objective",
    "per_example_loss",
    "regulariser",
]

CACHE_DIR = Path(__file__).resolve().parent / ".cache"
SPLIT_SEED = 0
N_TRAIN = 1000
N_TEST = 200
WEIGHT_DECAY = 1e-3
_CACHE_FORMAT = 1  # bump to invalidate every cached model


def cached(key: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` once per ``key``, kept in ``bench/.cache/<key>.pt`` (temp file, then rename)."""
    path = CACHE_DIR / f"{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)
    value = compute()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(value, tmp)
    tmp.replace(path)
    return value


# ----------------------------------------------------------------------------- data


def digits_split(seed: int = SPLIT_SEED, n_train: int = N_TRAIN, n_test: int = N_TEST):
    """(X_train, y_train, X_test, y_test) as float64 / int64 numpy arrays, standardised."""
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(seed).permutation(len(y))
    tr, te = perm[:n_train], perm[n_train : n_train + n_test]
    X = X.astype(np.float64)
    mu = X[tr].mean(axis=0)
    sd = X[tr].std(axis=0)
    sd[sd == 0] = 1.0
    Xs = (X - mu) / sd
    return Xs[tr], y[tr].astype(np.int64), Xs[te], y[te].astype(np.int64)


# ---------------------------------------------------------------- losses / measures


def per_example_loss(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each example, shape [B] (no regulariser)."""
    return F.cross_entropy(model(X), y, reduction="none")


def margin_from_logits(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct-class margin logit_y - logsumexp_{c != y} logit_c, shape [B].

    Written without one_hot/gather so it also works under torch.func.vmap.
    """
    classes = torch.arange(logits.shape[-1], device=logits.device)
    mask = classes == y.unsqueeze(-1)
    correct = torch.where(mask, logits, torch.zeros_like(logits)).sum(-1)
    others = torch.where(mask, torch.full_like(logits, float("-inf")), logits)
    return correct - torch.logsumexp(others, dim=-1)


def margin(model: nn.Module, X: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Correct-class margin of each example, shape [B]."""
    return margin_from_logits(model(X), y)


def measurement(model: nn.Module, X: torch.Tensor, y: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-example query measurement: ``"loss"`` (cross-entropy) or ``"margin"``."""
    if kind == "loss":
        return per_example_loss(model, X, y)
    if kind == "margin":
        return margin(model, X, y)
    raise ValueError(f"measurement must be 'loss' or 'margin', got {kind!r}")


def regulariser(params, weight_decay: float) -> torch.Tensor:
    """(weight_decay/2) * sum ||p||^2 over an iterable of tensors."""
    return 0.5 * weight_decay * sum((p * p).sum() for p in params)


def objective(model: nn.Module, X: torch.Tensor, y: torch.Tensor, weight_decay: float):
    """Training objective: mean CE + (weight_decay/2)||theta||^2."""
    return per_example_loss(model, X, y).mean() + regulariser(model.parameters(), weight_decay)


# ---------------------------------------------------------------------- problem


@dataclass(frozen=True)
class Problem:
    """A trained bench problem. ``model`` is in eval mode with float ``dtype``."""

    name: str
    X_train: torch.Tensor
    y_train: torch.Tensor
    X_test: torch.Tensor
    y_test: torch.Tensor
    model: nn.Module
    weight_decay: float
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def dtype(self) -> torch.dtype:
        return self.X_train.dtype

    @property
    def n_train(self) -> int:
        return int(self.X_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.X_test.shape[0])

    def astype(self, dtype: torch.dtype) -> Problem:
        """A copy with features and model in ``dtype`` (labels stay int64)."""
        model = copy.deepcopy(self.model).to(dtype)
        return dataclasses.replace(
            self, X_train=self.X_train.to(dtype), X_test=self.X_test.to(dtype), model=model
        )

    def fresh_model(self) -> nn.Module:
        """A deep copy of the trained model (peers may register hooks or wrap it)."""
        return copy.deepcopy(self.model)

    def test_accuracy(self) -> float:
        with torch.no_grad():
            return float((self.model(self.X_test).argmax(-1) == self.y_test).double().mean())

    def train_accuracy(self) -> float:
        with torch.no_grad():
            return float((self.model(self.X_train).argmax(-1) == self.y_train).double().mean())

    def grad_norm(self) -> float:
        """Norm of the gradient of the training objective at the stored weights."""
        m = self.model
        for p in m.parameters():
            p.grad = None
        with torch.enable_grad():
            objective(m, self.X_train, self.y_train, self.weight_decay).backward()
        g = torch.cat([p.grad.reshape(-1) for p in m.parameters()])
        for p in m.parameters():
            p.grad = None
        return float(g.norm())


def _key(settings: dict[str, Any]) -> str:
    blob = json.dumps({**settings, "_format": _CACHE_FORMAT}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_or_train(name: str, settings: dict[str, Any], build, train, use_cache: bool):
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    path = CACHE_DIR / f"{name}-{_key(settings)}.pt"
    model = build()
    if use_cache and path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    else:
        train(model)
        if use_cache:
            tmp = path.with_suffix(".tmp")
            torch.save(model.state_dict(), tmp)
            tmp.replace(path)  # atomic: never a half-written cache
    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _tensors(dtype):
    Xtr, ytr, Xte, yte = digits_split()
    return (
        torch.as_tensor(Xtr, dtype=dtype),
        torch.as_tensor(ytr),
        torch.as_tensor(Xte, dtype=dtype),
        torch.as_tensor(yte),
    )


# ----------------------------------------------------------------------- logreg


def _build_logreg(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 10).to(dtype)
    with torch.no_grad():
        lin.weight.zero_()
        lin.bias.zero_()
    return lin


def _train_logreg(model, X, y, wd, tol):
    opt = torch.optim.LBFGS(
        model.parameters(),
        lr=1.0,
        max_iter=500,
        history_size=50,
        tolerance_grad=1e-15,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = objective(model, X, y, wd)
        loss.backward()
        return loss

    def gnorm():
        opt.zero_grad()
        objective(model, X, y, wd).backward()
        return float(torch.cat([p.grad.reshape(-1) for p in model.parameters()]).norm())

    for _ in range(20):
        opt.step(closure)
        if gnorm() < tol:
            break
    # Newton polish in case L-BFGS stalled at float64 round-off above tol (it does: it
    # stops near 1e-9 on this problem; one Newton step reaches ~1e-16).
    from torch.func import functional_call, hessian

    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for p in model.parameters()]

    def f(theta):
        ps, o = {}, 0
        for n, s in zip(names, shapes):
            k = int(np.prod(s))
            ps[n] = theta[o : o + k].reshape(s)
            o += k
        out = functional_call(model, ps, (X,))
        return F.cross_entropy(out, y) + 0.5 * wd * (theta * theta).sum()

    for _ in range(5):
        if gnorm() < tol:
            break
        flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        g = torch.func.grad(f)(flat)
        H = hessian(f)(flat)
        flat = flat - torch.linalg.solve(H, g)
        with torch.no_grad():
            o = 0
            for p in model.parameters():
                k = p.numel()
                p.copy_(flat[o : o + k].reshape(p.shape))
                o += k
    opt.zero_grad()
    for p in model.parameters():
        p.grad = None


def logreg(dtype: torch.dtype = torch.float64, *, use_cache: bool = True) -> Problem:
    """L2-regularised multinomial logistic regression, trained in float64 to ||grad|| < 1e-10.

    ``dtype=torch.float32`` gives a float32 copy of the same (float64-trained) optimum.
    """
    settings = {
        "problem": "logreg",
        "arch": "Linear(64,10)",
        "weight_decay": WEIGHT_DECAY,
        "train_dtype": "float64",
        "optimizer": "LBFGS(strong_wolfe)",
        "grad_tol": 1e-10,
        "split_seed": SPLIT_SEED,
        "n_train": N_TRAIN,
        "n_test": N_TEST,
    }
    Xtr, ytr, Xte, yte = _tensors(torch.float64)
    model = _load_or_train(
        "logreg",
        settings,
        lambda: _build_logreg(torch.float64),
        lambda m: _train_logreg(m, Xtr, ytr, WEIGHT_DECAY, settings["grad_tol"]),
        use_cache,
    )
    p = Problem("logreg", Xtr, ytr, Xte, yte, model, WEIGHT_DECAY, settings)
    return p if dtype == torch.float64 else p.astype(dtype)


# -------------------------------------------------------------------------- mlp


def _build_mlp(dtype, seed):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10)
    ).to(dtype)


def _train_mlp(model, X, y, wd, epochs, batch_size, lr, seed, on_epoch=None):
    """The ``mlp`` recipe in place; ``on_epoch(epoch, model)`` (1-based) after every epoch."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = X.shape[0]
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(0, n, batch_size):
            idx = perm[s : s + batch_size]
            opt.zero_grad()
            # minibatch estimate of the same objective (mean CE + wd/2 ||theta||^2)
            objective(model, X[idx], y[idx], wd).backward()
            opt.step()
        if on_epoch is not None:
            on_epoch(epoch + 1, model)
    for p in model.parameters():
        p.grad = None


def mlp(dtype: torch.dtype = torch.float32, *, use_cache: bool = True) -> Problem:
    """64-128-64-10 tanh MLP, float32, minibatch Adam from a fixed seed."""
    settings = {
        "problem": "mlp",
        "arch": "64-128-64-10 tanh",
        "weight_decay": WEIGHT_DECAY,
        "train_dtype": "float32",
        "optimizer": "Adam",
        "lr": 1e-3,
        "epochs": 200,
        "batch_size": 50,
        "seed": 0,
        "split_seed": SPLIT_SEED,
        "n_train": N_TRAIN,
        "n_test": N_TEST,
    }
    Xtr, ytr, Xte, yte = _tensors(torch.float32)
    model = _load_or_train(
        "mlp",
        settings,
        lambda: _build_mlp(torch.float32, settings["seed"]),
        lambda m: _train_mlp(
            m,
            Xtr,
            ytr,
            WEIGHT_DECAY,
            settings["epochs"],
            settings["batch_size"],
            settings["lr"],
            settings["seed"],
        ),
        use_cache,
    )
    p = Problem("mlp", Xtr, ytr, Xte, yte, model, WEIGHT_DECAY, settings)
    return p if dtype == torch.float32 else p.astype(dtype)


def get_problem(name: str, dtype: torch.dtype | None = None, **kw) -> Problem:
    """``get_problem("logreg")`` / ``get_problem("mlp")``; dtype defaults to the training dtype."""
    fns = {"logreg": logreg, "mlp": mlp}
    if name not in fns:
        raise ValueError(f"unknown problem {name!r}; expected one of {sorted(fns)}")
    if dtype is None:
        return fns[name](**kw)
    return fns[name](dtype, **kw)


if __name__ == "__main__":
    import time

    for fn in (logreg, mlp):
        t = time.perf_counter()
        p = fn(use_cache=False)
        dt = time.perf_counter() - t
        print(
            f"{p.name}: trained in {dt:.1f} s, train acc {p.train_accuracy():.3f}, "
            f"test acc {p.test_accuracy():.3f}, ||grad|| {p.grad_norm():.2e}, dtype {p.dtype}"
        )
