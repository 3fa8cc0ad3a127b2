"""Leave-one-out ground truth by real retraining."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headwater.data import DataLike, as_tensors, check_indices, num_examples
from headwater.gradients.functional import bind, detached, evaluation_mode, prepare_batch
from headwater.progress import ProgressFn, report
from headwater.task import Task
from headwater.train.lbfgs import minimize_objective

__all__ = ["LOOResult", "TrainFn", "leave_one_out", "measure"]

TrainFn = Callable[[nn.Module, DataLike, Tensor], nn.Module]
"""``train_fn(model, train, weights) -> trained model``: retrain a copy of ``model`` on
``train`` with per-example weights ``[n]`` (the removed example has weight 0)."""


@dataclass(frozen=True)
class LOOResult:
    """``actual[q, j] = m(z_q; θ_{-i_j}) − m(z_q; θ)`` for removed examples ``i_j = indices[j]``."""

    actual: Tensor  # [n_query, n_removed]
    base: Tensor  # [n_query], measurement at the full-data optimum
    indices: Tensor  # [n_removed]
    base_model: nn.Module  # the model retrained on all data (influence must be computed here)


def measure(model: nn.Module, task: Task, query: DataLike) -> Tensor:
    """Per-query measurement ``[n_query]`` (no gradient, eval mode)."""
    params = detached(task.parameters(model))
    ref = next(iter(params.values()))
    batch = prepare_batch(as_tensors(query, "query"), ref)
    with torch.no_grad(), evaluation_mode(model):
        return task.measurement(bind(model, params), batch)


def leave_one_out(
    model: nn.Module,
    task: Task,
    train: DataLike,
    query: DataLike,
    indices: Sequence[int] | Tensor,
    *,
    train_fn: TrainFn | None = None,
    renormalize: bool = False,
    tol: float = 1e-10,
    max_iter: int = 2000,
    progress: ProgressFn | None = None,
) -> LOOResult:
    """Retrain without each chosen example and measure every query.

    The removed example gets weight 0 while the others keep ``1/n`` (regulariser
    unchanged), the view under which ``score/n`` estimates the change; with
    ``renormalize=True`` the others get ``1/(n−1)``. Without ``train_fn``, every
    retraining is full-batch L-BFGS warm-started from the full-data optimum, which
    is itself first recomputed to ``tol`` (for convex models). With ``train_fn``,
    each retraining calls it on a fresh copy of ``model`` (non-convex models).

    Returns:
        :class:`LOOResult` with ``actual [n_query, len(indices)]``.
    """
    n = num_examples(train, "train")
    idx = check_indices(indices, n)
    ref = next(iter(task.parameters(model).values()))
    full = torch.full((n,), 1.0 / n, dtype=ref.dtype, device=ref.device)

    def retrain(start: nn.Module, weights: Tensor) -> nn.Module:
        if train_fn is not None:
            return train_fn(copy.deepcopy(model), train, weights)
        fresh = copy.deepcopy(start)
        minimize_objective(fresh, task, train, weights=weights, tol=tol, max_iter=max_iter)
        return fresh

    base_model = retrain(model, full)
    base = measure(base_model, task, query)
    columns = []
    for j, i in enumerate(idx.tolist()):
        w = full.clone()
        w[i] = 0.0
        if renormalize:
            w = w * n / (n - 1)
        columns.append(measure(retrain(base_model, w), task, query) - base)
        report(progress, "leave-one-out", j + 1, idx.numel())
    return LOOResult(torch.stack(columns, dim=1), base, idx, base_model)
