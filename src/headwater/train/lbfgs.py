"""Full-batch L-BFGS on the weighted training objective, to a tight tolerance.

    J_w(θ) = Σ_i w_i ℓ(z_i; θ) + (weight_decay / 2) ‖θ_selected‖²

with ``w_i = 1/n`` by default (the objective the curvature describes). Only the
task's selected parameters are optimised. Meant for convex models, where the
minimiser is unique and a warm start reaches it quickly.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from headwater.data import DataLike, as_tensors
from headwater.gradients.functional import evaluation_mode, prepare_batch
from headwater.gradients.per_example import check_values
from headwater.task import Task

__all__ = ["minimize_objective", "objective_value"]

_ROUNDS = 5  # L-BFGS runs, each from a fresh history


def objective_value(
    model: nn.Module, task: Task, inputs: Tensor, targets: Tensor, weights: Tensor
) -> Tensor:
    """``J_w(θ)`` for the model's current parameters (differentiable)."""
    losses = task.train_loss(model, (inputs, targets))
    check_values(losses, inputs.shape[0], "train")
    reg = sum(p.pow(2).sum() for p in task.parameters(model).values())
    return (weights * losses).sum() + 0.5 * task.weight_decay * reg


def minimize_objective(
    model: nn.Module,
    task: Task,
    data: DataLike,
    *,
    weights: Tensor | None = None,
    tol: float = 1e-10,
    max_iter: int = 2000,
) -> float:
    """Minimise ``J_w`` over the selected parameters of ``model`` **in place**
    (pass a copy to keep the original); returns the final gradient norm.

    Raises:
        RuntimeError: if the gradient norm is not below ``tol`` after ``max_iter``
            iterations (name the setting to change).
    """
    params = list(task.parameters(model).values())
    ref = params[0]
    inputs, targets = prepare_batch(as_tensors(data, "train"), ref)
    n = inputs.shape[0]
    w = (
        torch.full((n,), 1.0 / n, dtype=ref.dtype, device=ref.device)
        if weights is None
        else weights.to(ref)
    )
    if w.shape != (n,):
        raise ValueError(f"weights: expected shape [{n}], got {tuple(w.shape)}")

    def gradient_norm() -> float:
        value = objective_value(model, task, inputs, targets, w)
        grads = torch.autograd.grad(value, params)
        return torch.linalg.vector_norm(torch.cat([g.reshape(-1) for g in grads])).item()

    with evaluation_mode(model):
        for _ in range(_ROUNDS):  # a fresh history restarts a line search stalled near the optimum
            opt = torch.optim.LBFGS(
                params,
                lr=1.0,
                max_iter=max_iter,
                tolerance_grad=tol,
                tolerance_change=0.0,
                history_size=50,
                line_search_fn="strong_wolfe",
            )

            def closure(opt: torch.optim.LBFGS = opt) -> Tensor:
                opt.zero_grad(set_to_none=False)
                value = objective_value(model, task, inputs, targets, w)
                value.backward()
                return value

            opt.step(closure)
            grad_norm = gradient_norm()
            if grad_norm <= tol:
                break
    for p in params:
        p.grad = None
    if grad_norm > 100 * tol:
        raise RuntimeError(
            f"L-BFGS stopped at gradient norm {grad_norm:.3g} > tol={tol:g}; raise `max_iter` "
            "or loosen `tol` (is the objective convex and the model in float64?)"
        )
    return grad_norm
