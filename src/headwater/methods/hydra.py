"""HYDRA: hypergradient data relevance (Chen et al. 2021), by reverse-mode replay.

For a recorded SGD run (:func:`headwater.train.sgd.train_sgd`) with per-example
weights ``w`` in ``L_t = (1/B) Σ_{j∈B_t} w_j ℓ_j + (λ/2)‖θ‖²``, momentum ``μ`` and
learning rates ``η_t``, HYDRA computes the hypergradient ``d m(z_q; θ_T) / d w_i`` of
every query's measurement at the end of training. Going backwards with adjoints
``a_θ`` (start ``∇m(θ_T)``) and ``a_v`` (start 0), step ``t`` does

    ā = a_v − η_t a_θ                         (total adjoint of v_{t+1})
    d m/d w_i += ā · ∇ℓ_i(θ_t) / B            for i ∈ B_t
    a_θ ← a_θ + (H_t + λI) ā                   (H_t: Hessian of the weighted batch loss)
    a_v ← μ ā

which is exact for this run (finite differences of ``w`` agree to rounding); with
``hessian_free=True`` the ``H_t`` term is dropped (the paper's fast variant).
Removing example ``i`` moves its weight from 1 to 0, so the measurement changes by
about ``−dm/dw_i``; the score is ``−n · dm/dw_i`` so that, as everywhere in
headwater, removal changes ``m(z_q)`` by about ``+score[q, i]/n`` (positive =
proponent with the loss as measurement). All queries are carried at once: cost is
one batched Hessian-vector product per step, memory ``O(n_query · P)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from headwater.data import DataLike, as_tensors, num_examples
from headwater.gradients.functional import evaluation_mode, prepare_batch
from headwater.gradients.per_example import check_values
from headwater.methods.estimator import Estimator
from headwater.progress import ProgressFn, report
from headwater.task import Task
from headwater.train.sgd import Trajectory

__all__ = ["Hydra"]


class Hydra(Estimator):
    """Hypergradient scores ``[n_query, n_train]`` for a recorded SGD trajectory.

    Args:
        model: the architecture (its parameters are not read or changed; the
            trajectory supplies θ_t).
        task: the task the run was trained with (loss, weight decay, parameters).
        trajectory: from :func:`headwater.train.sgd.train_sgd` on the same ``train``.
        hessian_free: drop the ``H_t`` terms (faster, approximate).
        progress: optional ``progress(stage, done, total)`` callback.
    """

    method = "hydra"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        trajectory: Trajectory,
        *,
        hessian_free: bool = False,
        progress: ProgressFn | None = None,
    ):
        if not isinstance(trajectory, Trajectory):
            raise TypeError(
                f"trajectory: expected a headwater Trajectory, got {type(trajectory).__name__}"
            )
        layout = task.parameters(model)
        if tuple(layout) != trajectory.layout.names:
            raise ValueError("trajectory: recorded for other parameters than the task selects")
        self.model, self.task, self.trajectory = model, task, trajectory
        self.hessian_free, self.progress = bool(hessian_free), progress

    def _bound(self, theta: Tensor):
        params = self.trajectory.layout.unflatten(theta)
        return lambda inputs: functional_call(self.model, params, (inputs,), strict=False)

    def _batch_hvp(self, theta: Tensor, x: Tensor, y: Tensor, w: Tensor, vectors: Tensor) -> Tensor:
        """``H_t V`` for the weighted batch loss ``(1/B) Σ w_j ℓ_j`` at ``theta``, ``V [Q, P]``."""

        def loss(t: Tensor) -> Tensor:
            return (w * self.task.train_loss(self._bound(t), (x, y))).mean()

        g = grad(loss)
        return vmap(lambda v: jvp(g, (theta,), (v,))[1])(vectors)

    def _per_example(self, fn, theta: Tensor, x: Tensor, y: Tensor) -> Tensor:
        """Per-example gradients ``[B, P]`` of ``fn`` (a task method) at the flat ``theta``."""

        def single(t: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
            return fn(self._bound(t), (xi.unsqueeze(0), yi.unsqueeze(0))).sum()

        return vmap(grad(single), in_dims=(None, 0, 0))(theta, x, y)

    def hypergradients(self, query: DataLike, train: DataLike) -> Tensor:
        """``d m(z_q; θ_T) / d w_i``, ``[n_query, n_train]``."""
        traj = self.trajectory
        n = num_examples(train, "train")
        if n != traj.weights.shape[0]:
            raise ValueError(
                f"train: the trajectory was recorded on {traj.weights.shape[0]} examples, got {n}"
            )
        x_all, y_all = prepare_batch(as_tensors(train, "train"), traj.params)
        x_q, y_q = prepare_batch(as_tensors(query, "query"), traj.params)
        steps = len(traj.batches)
        with evaluation_mode(self.model):
            a_theta = self._per_example(self.task.measurement, traj.params[-1], x_q, y_q)  # [Q, P]
            check_values(a_theta.sum(1), x_q.shape[0], "query")
            a_v = torch.zeros_like(a_theta)
            out = torch.zeros(a_theta.shape[0], n, dtype=a_theta.dtype)
            for k, t in enumerate(reversed(range(steps))):
                idx, theta, lr = traj.batches[t], traj.params[t], traj.lrs[t]
                x, y, w = x_all[idx], y_all[idx], traj.weights[idx]
                a_bar = a_v - lr * a_theta
                g_batch = self._per_example(self.task.train_loss, theta, x, y)  # [B, P]
                out[:, idx] += a_bar @ g_batch.T / len(idx)
                step = self.task.weight_decay * a_bar
                if not self.hessian_free:
                    step = step + self._batch_hvp(theta, x, y, w, a_bar)
                a_theta = a_theta + step
                a_v = traj.config.momentum * a_bar
                report(self.progress, "hydra steps", k + 1, steps)
        return out

    def scores(self, query: DataLike, train: DataLike) -> Tensor:
        """``−n · dm/dw_i``: removal changes ``m(z_q)`` by about ``+score/n``, ``[n_query, n_train]``."""
        return -num_examples(train, "train") * self.hypergradients(query, train)

    def settings(self) -> dict[str, Any]:
        c = self.trajectory.config
        return {
            "method": "hydra",
            "hessian_free": self.hessian_free,
            "lr": c.lr,
            "epochs": c.epochs,
            "batch_size": c.batch_size,
            "momentum": c.momentum,
            "seed": c.seed,
            "task": self.task.to_dict(),
        }
