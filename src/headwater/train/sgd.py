"""Mini-batch SGD (momentum, L2) that records its trajectory, for trajectory methods.

Per-example weights ``w`` (default all 1) enter the mini-batch objective

    L_t(θ) = (1/B) Σ_{j∈B_t} w_j ℓ(z_j; θ) + (weight_decay / 2) ‖θ‖²,

and the update is ``torch.optim.SGD``'s (no dampening, L2 in the loss):

    v_{t+1} = μ v_t + ∇L_t(θ_t),   θ_{t+1} = θ_t − η_t v_{t+1}.

Every epoch draws a permutation of the ``n`` examples from a generator seeded with
``seed``, so runs with the same seed and different weights see the same batches:
HYDRA differentiates exactly this run, and finite differences of ``w`` check it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from headwater.data import DataLike, as_tensors
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import detached, evaluation_mode, prepare_batch
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = ["SGDConfig", "Trajectory", "train_sgd"]


@dataclass(frozen=True)
class SGDConfig:
    """Settings of a recorded SGD run.

    Attributes:
        lr: learning rate, or one per epoch (a schedule).
        epochs, batch_size: as usual; the last batch of an epoch may be smaller.
        momentum: μ in [0, 1).
        seed: seeds the batch order.
    """

    lr: float | tuple[float, ...] = 0.1
    epochs: int = 1
    batch_size: int = 32
    momentum: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        lrs = (self.lr,) if isinstance(self.lr, int | float) else tuple(self.lr)
        if not lrs or not all(
            isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in lrs
        ):
            raise ValueError(f"lr: expected a float > 0 or one per epoch, got {self.lr!r}")
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if len(lrs) not in (1, self.epochs):
            raise ValueError(
                f"lr: a schedule needs one value per epoch ({self.epochs}), got {len(lrs)}"
            )
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: must lie in [0, 1), got {self.momentum!r}")

    def lr_at(self, epoch: int) -> float:
        return float(self.lr) if isinstance(self.lr, int | float) else float(self.lr[epoch])


@dataclass(frozen=True)
class Trajectory:
    """The recorded run: ``params[t]`` is θ_t (flat, ``[T+1, P]``), ``batches[t]`` the
    indices of step ``t``, ``lrs[t]`` its learning rate."""

    params: Tensor  # [T+1, P]
    weights: Tensor  # [n], the per-example weights of the run
    batches: tuple[Tensor, ...]
    lrs: tuple[float, ...]
    layout: ParamLayout
    config: SGDConfig


def _objective(model, task, layout, theta, x, y, w):
    out = task.output(
        lambda inp: functional_call(model, layout.unflatten(theta), (inp,), strict=False), x
    )
    return (w * task.loss(out, y)).mean() + 0.5 * task.weight_decay * theta.pow(2).sum()


def train_sgd(
    model: nn.Module,
    task: Task,
    train: DataLike,
    config: SGDConfig,
    *,
    weights: Tensor | None = None,
    progress: ProgressFn | None = None,
) -> Trajectory:
    """Train the task's selected parameters of ``model`` **in place** and record the run.

    Memory: the trajectory holds every θ_t, ``(T+1)·P`` numbers.
    """
    params = task.parameters(model)
    layout = ParamLayout.of(params)
    theta = layout.flatten(detached(params)).clone()
    x_all, y_all = prepare_batch(as_tensors(train, "train"), theta)
    n = x_all.shape[0]
    w_all = torch.ones(n, dtype=theta.dtype) if weights is None else weights.to(theta)
    if w_all.shape != (n,):
        raise ValueError(f"weights: expected shape [{n}], got {tuple(w_all.shape)}")
    gen = torch.Generator().manual_seed(config.seed)
    velocity = torch.zeros_like(theta)
    states, batches, lrs = [theta.clone()], [], []
    steps_per_epoch = math.ceil(n / config.batch_size)
    with evaluation_mode(model):
        for epoch in range(config.epochs):
            order = torch.randperm(n, generator=gen)
            for s in range(steps_per_epoch):
                idx = order[s * config.batch_size : (s + 1) * config.batch_size]
                t = theta.detach().requires_grad_(True)
                loss = _objective(model, task, layout, t, x_all[idx], y_all[idx], w_all[idx])
                if not torch.isfinite(loss):
                    raise ValueError(
                        f"train: the loss became {loss.item()} at epoch {epoch}; lower `lr`"
                    )
                (g,) = torch.autograd.grad(loss, t)
                velocity = config.momentum * velocity + g
                theta = theta - config.lr_at(epoch) * velocity
                states.append(theta.clone())
                batches.append(idx)
                lrs.append(config.lr_at(epoch))
            report(progress, "sgd epochs", epoch + 1, config.epochs)
    with torch.no_grad():
        for name, value in layout.unflatten(theta).items():
            params[name].copy_(value)
    return Trajectory(torch.stack(states), w_all, tuple(batches), tuple(lrs), layout, config)
