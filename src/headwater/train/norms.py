"""BatchNorm layers trained in train mode, made replayable and differentiable.

In train mode a BatchNorm normalises each batch with that batch's statistics and moves
its running statistics towards them; only the trained model's eval-mode predictions read
the running statistics, so they never change the parameters' trajectory, but they are
part of what training produces. A run recorded with such layers
(:class:`~headwater.train.recorder.Recorder` notes which, and checkpoints their running
statistics) is replayed with the same layers in train mode.

With example weights ``w`` (:func:`~headwater.train.recorder.replay`, the metagradient)
a layer normalises with the *weighted* batch statistics

    μ = Σ_b w_b Σ_s x_bs / m,   σ² = Σ_b w_b Σ_s (x_bs − μ)² / m,   m = S·Σ_b w_b

(``S`` positions per example and channel), so an example of weight 0 is absent from its
batch, as in retraining without it, and the weights are differentiable through the
statistics too. Its running statistics move as torch's do: ``r ← (1 − f) r + f s`` with
``s = (μ, σ²·m/(m − 1))`` and ``f`` the layer's momentum (``1/(batches so far)`` when
its momentum is None). At ``w = 1`` this is torch's train-mode BatchNorm up to rounding;
:func:`~headwater.train.recorder.replay` without weights runs torch's own layer.

The running statistics of the layers, in the order of :attr:`RunRecord.norms`, are one
flat vector ``r = (mean_1, var_1, mean_2, var_2, ...)`` here (:func:`running_vector`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = [
    "BUFFERS",
    "STATS",
    "cancelled",
    "factors",
    "norm_layers",
    "running_dict",
    "running_norms",
    "running_vector",
    "stats_vector",
    "trained_norms",
    "weighted_norms",
]

STATS = ("running_mean", "running_var")
"""The running statistics of a layer, in the order of the flat vector."""

BUFFERS = (*STATS, "num_batches_tracked")
"""A layer's buffers a checkpoint holds."""


def trained_norms(model: nn.Module) -> tuple[str, ...]:
    """Names of the BatchNorm layers of ``model`` that normalise with batch statistics and
    track running statistics now (train mode)."""
    return tuple(
        name
        for name, m in model.named_modules()
        if isinstance(m, _BatchNorm) and m.training and m.track_running_stats
    )


def norm_layers(model: nn.Module, names: Sequence[str]) -> list[_BatchNorm]:
    """The BatchNorm layers ``names`` of ``model``; a name that is not one raises."""
    if not names:
        return []
    modules = dict(model.named_modules())
    missing = [n for n in names if not isinstance(modules.get(n), _BatchNorm)]
    if missing:
        raise ValueError(f"model: has no BatchNorm {missing[0]!r} that the run trained")
    return [modules[n] for n in names]


def running_vector(buffers: dict[str, Tensor], names: Sequence[str]) -> Tensor:
    """The flat running statistics ``r`` of the layers ``names`` from ``{"<layer>.<stat>": tensor}``."""
    if not names:
        return torch.zeros(0)
    return torch.cat([buffers[f"{n}.{s}"].reshape(-1) for n in names for s in STATS])


def running_dict(
    vector: Tensor, names: Sequence[str], like: dict[str, Tensor]
) -> dict[str, Tensor]:
    """``{"<layer>.<stat>": tensor}`` of the flat ``vector`` (shapes of ``like``, and its
    ``num_batches_tracked``)."""
    out, at = {}, 0
    for n in names:
        for s in STATS:
            size = like[f"{n}.{s}"].numel()
            out[f"{n}.{s}"] = vector[at : at + size].view_as(like[f"{n}.{s}"])
            at += size
        key = f"{n}.num_batches_tracked"
        if key in like:
            out[key] = like[key]
    return out


def factors(
    model: nn.Module, names: Sequence[str], buffers: dict[str, Tensor], steps_since: int
) -> Tensor:
    """``f [R]``: how far each running statistic moves towards the batch's at the step taken
    ``steps_since`` steps after the checkpoint whose buffers are ``buffers`` (0: the first
    step after it): the layer's momentum, or ``1/(batches so far)`` when it is None."""
    parts = []
    for n, m in zip(names, norm_layers(model, names), strict=True):
        if m.momentum is None:
            f = 1.0 / (int(buffers[f"{n}.num_batches_tracked"]) + steps_since + 1)
        else:
            f = float(m.momentum)
        parts.append(torch.full((2 * m.num_features,), f, dtype=torch.float64))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)


def _statistics(x: Tensor, w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(μ, σ², m)`` of ``x [B, C, *]`` per channel with example weights ``w [B]``. A batch
    whose weights leave at most one value per channel (nothing to normalise with) takes
    its unweighted statistics: its examples carry no loss weight anyway. Sums over the
    positions come first, so the weights meet ``[B, C]`` tensors: two temporaries of the
    input's size (the centred values and their squares)."""
    flat = x.reshape(x.shape[0], x.shape[1], -1)
    per = flat.shape[2]
    mass = w.sum() * per
    w = torch.where(mass > 1, w, torch.ones_like(w))
    mass = w.sum() * per
    w = w.to(x.dtype)
    mean = (w @ flat.sum(2)) / mass
    centred = flat - mean[:, None]
    return mean, (w @ (centred * centred).sum(2)) / mass, mass


def _normalised(m: _BatchNorm, x: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """The layer's output for ``x`` normalised by ``mean`` and ``var`` per channel, as
    ``x·scale + shift`` (as torch's kernel computes it: one temporary of the input's size)."""
    scale = torch.rsqrt(var + m.eps)
    shift = -mean * scale
    if m.weight is not None:
        scale, shift = scale * m.weight, shift * m.weight + m.bias
    shape = (1, -1, *([1] * (x.dim() - 2)))
    return torch.addcmul(shift.reshape(shape), x, scale.reshape(shape))


@contextlib.contextmanager
def _patched(layers: Sequence[_BatchNorm], forwards: Sequence) -> Iterator[None]:
    """Give each layer the forward ``forwards[i]`` while active (an instance's own forward,
    if it had one, comes back after)."""
    own = [m.__dict__.get("forward") for m in layers]
    for m, forward in zip(layers, forwards, strict=True):
        m.forward = forward
    try:
        yield
    finally:
        for m, previous in zip(layers, own, strict=True):
            if previous is None:
                del m.forward
            else:
                m.forward = previous


@contextlib.contextmanager
def running_norms(model: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """While active, the BatchNorm layers ``names`` normalise with their running statistics
    (eval mode) by plain tensor arithmetic, differentiable in the running statistics too
    (torch's kernel is not): the trained model's predictions as a function of them."""
    layers = norm_layers(model, names)

    def running(m: _BatchNorm):
        def forward(x: Tensor) -> Tensor:
            return _normalised(m, x, m.running_mean, m.running_var)

        return forward

    with _patched(layers, [running(m) for m in layers]):
        yield


@contextlib.contextmanager
def weighted_norms(
    model: nn.Module,
    names: Sequence[str],
    weights: Tensor | None,
    *,
    update: bool = False,
) -> Iterator[dict[str, tuple[Tensor, Tensor]]]:
    """While active, the BatchNorm layers ``names`` of ``model`` normalise with the batch
    statistics weighted by ``weights [B]`` (None: all 1) whatever their mode, and put their
    ``(μ, unbiased σ²)`` of the call into the yielded dict by name; with ``update`` they
    also move their running statistics (and count) in place, as torch does in train mode.
    Each layer must be called once per forward pass."""
    layers = norm_layers(model, names)
    stats: dict[str, tuple[Tensor, Tensor]] = {}

    def weighted(name: str, m: _BatchNorm):
        def forward(x: Tensor) -> Tensor:
            if name in stats:
                raise ValueError(
                    f"model: BatchNorm {name!r} is called twice in one forward pass; a run "
                    "through it cannot be replayed with example weights"
                )
            w = torch.ones(x.shape[0], dtype=x.dtype) if weights is None else weights
            if w.shape[0] != x.shape[0]:
                raise ValueError(
                    f"model: BatchNorm {name!r} sees {x.shape[0]} rows for a batch of "
                    f"{w.shape[0]} examples; a run through it cannot be replayed with "
                    "example weights"
                )
            mean, var, mass = _statistics(x, w)
            out = _normalised(m, x, mean, var)
            unbiased = var * mass / (mass - 1)
            stats[name] = (mean, unbiased)
            if update:
                with torch.no_grad():
                    m.num_batches_tracked.add_(1)
                    f = (
                        1.0 / float(m.num_batches_tracked)
                        if m.momentum is None
                        else float(m.momentum)
                    )
                    m.running_mean.mul_(1 - f).add_(f * mean.detach())
                    m.running_var.mul_(1 - f).add_(f * unbiased.detach())
            return out

        return forward

    with _patched(layers, [weighted(n, m) for n, m in zip(names, layers, strict=True)]):
        yield stats


def stats_vector(stats: dict[str, tuple[Tensor, Tensor]], names: Sequence[str]) -> Tensor:
    """The flat ``s`` of a forward pass's statistics (layers ``names``, each ``(μ, σ²)``)."""
    missing = [n for n in names if n not in stats]
    if missing:
        raise ValueError(
            f"model: BatchNorm {missing[0]!r}, trained in train mode, was not called in the "
            "forward pass"
        )
    return torch.cat([t for n in names for t in stats[n]])


def cancelled(losses: Callable[[dict[str, Tensor]], Tensor], params: dict[str, Tensor]) -> set[str]:
    """The names of ``params`` that ``losses(params) [B]`` does not depend on: a bias right
    before a BatchNorm normalising with batch statistics shifts each channel by a constant
    the statistics take out again. Perturbing such a parameter by its own size changes no
    loss beyond rounding (``10⁴ ε (1 + max |ℓ|)``); perturbing any other changes them by
    orders of magnitude more. In exact arithmetic their gradient is 0; computed, it is
    rounding noise."""
    generator = torch.Generator().manual_seed(0)
    found = set()
    with torch.no_grad():
        base = losses(params)
        tol = 1e4 * torch.finfo(base.dtype).eps * (1 + float(base.abs().max()))
        for name, p in params.items():
            size = float(p.pow(2).mean().sqrt()) + 1e-2
            delta = torch.randn(p.shape, generator=generator, dtype=p.dtype) * size
            if float((losses({**params, name: p + delta}) - base).abs().max()) <= tol:
                found.add(name)
    return found
