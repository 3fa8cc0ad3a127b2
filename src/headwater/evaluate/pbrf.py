"""Proximal Bregman response function (Bae et al. 2022, "If Influence Functions are the
Answer, Then What is the Question?").

Influence functions with a damped GGN do not approximate leave-one-out retraining
on non-convex models; they approximate the minimiser of the proximal Bregman
objective, started from the trained parameters ``θ_s``. For a removed training
example ``z_i`` (weight ``ε``; ``ε = 1/n`` removes it, a negative ``ε`` up-weights it):

    r_i(θ) = (1/n) Σ_j D_ℓ(f(x_j; θ), f(x_j; θ_s); y_j)
             + (weight_decay / 2) ‖θ − θ_s‖²
             − ε ℓ(z_i; θ)
             + (damping / 2) ‖θ − θ_s‖²,

    D_ℓ(o, o_s; y) = ℓ(o, y) − ℓ(o_s, y) − ∇_o ℓ(o_s, y)ᵀ (o − o_s)

(the Bregman divergence of the loss in output space). The ``weight_decay`` term is
the Bregman divergence of the Task's L2 regulariser, so that the quadratic model of
``r_i`` at ``θ_s`` has Hessian ``G + weight_decay·I + damping·I = M + λI``, the
damped GGN of headwater's influence (REFERENCES.md: compare with the GGN and use the
*same* damping). Linearising, ``θ_i − θ_s ≈ ε (M + λI)⁻¹ ∇ℓ(z_i)``, so the response

    response[q, j] = m(z_q; θ_{i_j}) − m(z_q; θ_s) ≈ ε · score[q, i_j]

is ``score/n`` for ``ε = 1/n``: positive when removing ``i`` raises the measurement,
DESIGN.md's sign. For a linear model with a convex loss and ``damping = 0`` the
objective equals the leave-one-out objective exactly.

Only the Task's analysed parameters move; every removed example is optimised at once
(one L-BFGS run on the separable sum of the objectives, vectorised with ``vmap``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import grad, vmap

from headwater.data import DataLike, as_tensors, check_indices, num_examples
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import bind, detached, evaluation_mode, prepare_batch
from headwater.task import Task

__all__ = ["PBRFResult", "pbrf"]


@dataclass(frozen=True)
class PBRFResult:
    """``response[q, j] = m(z_q; θ_{i_j}) − m(z_q; θ_s)`` (≈ ``epsilon · score[q, i_j]``).

    Attributes:
        response: ``[n_query, n_removed]``.
        indices: ``[n_removed]``.
        epsilon: the removal weight ``ε``.
        damping: ``λ`` of the proximity term.
        grad_norm: ``[n_removed]`` final gradient norm of each objective.
    """

    response: Tensor
    indices: Tensor
    epsilon: float
    damping: float
    grad_norm: Tensor


def _check_float(name: str, value: object, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite float, got {value!r}")
    if value < 0 or (positive and value == 0):
        raise ValueError(f"{name}: must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return float(value)


def pbrf(
    model: nn.Module,
    task: Task,
    train: DataLike,
    query: DataLike,
    indices: Sequence[int] | Tensor,
    *,
    damping: float,
    epsilon: float | None = None,
    tol: float = 1e-8,
    max_iter: int = 1000,
) -> PBRFResult:
    """Minimise the proximal Bregman objective for each removed example (module docstring).

    Args:
        model: the trained model, ``θ_s`` (never modified; evaluated in eval mode).
        task: loss, weight decay, analysed parameters and measurement.
        train, query: the data (held in memory).
        indices: training examples to remove (one objective each).
        damping: ``λ``, the same value as the influence curvature's
            (``curvature.fitted_damping``).
        epsilon: removal weight ``ε``; default ``1/n``.
        tol: gradient-norm tolerance of every objective.
        max_iter: L-BFGS iterations per round (up to 20 rounds).

    Returns:
        :class:`PBRFResult`.

    Raises:
        ValueError: naming the argument for bad input; RuntimeError if L-BFGS does
            not reach ``tol`` (raise ``max_iter`` or ``damping``).
    """
    damping = _check_float("damping", damping)
    tol = _check_float("tol", tol, positive=True)
    n = num_examples(train, "train")
    epsilon = 1.0 / n if epsilon is None else epsilon
    if (
        isinstance(epsilon, bool)
        or not isinstance(epsilon, int | float)
        or not math.isfinite(epsilon)
    ):
        raise ValueError(f"epsilon: expected a finite float, got {epsilon!r}")
    idx = check_indices(indices, n)
    params = detached(task.parameters(model))
    layout = ParamLayout.of(params)
    theta_s = layout.flatten(params).clone()  # [P]
    x, y = prepare_batch(as_tensors(train, "train"), theta_s)
    xq, yq = prepare_batch(as_tensors(query, "query"), theta_s)
    coef = 0.5 * (task.weight_decay + damping)

    def outputs(t: Tensor, inputs: Tensor) -> Tensor:
        return task.output(bind(model, layout.unflatten(t)), inputs)

    with evaluation_mode(model):
        with torch.no_grad():
            out_s = outputs(theta_s, x)
            loss_s = task.loss(out_s, y)  # [n]
        grad_out_s = torch.func.grad(lambda o: task.loss(o, y).sum())(out_s)  # [n, *out]

        def objective(t: Tensor, xi: Tensor, yi: Tensor) -> Tensor:
            out = outputs(t, x)
            bregman = (
                task.loss(out, y) - loss_s - (grad_out_s * (out - out_s)).reshape(n, -1).sum(1)
            )
            removed = task.loss(outputs(t, xi[None]), yi[None]).sum()
            return bregman.mean() + coef * (t - theta_s).pow(2).sum() - epsilon * removed

        xi, yi = x[idx], y[idx]
        batched = vmap(objective)
        grads_of = vmap(grad(objective))
        theta = theta_s.expand(idx.numel(), -1).clone().requires_grad_(True)  # [K, P]

        def closure() -> Tensor:
            theta.grad = None
            value = batched(theta, xi, yi).sum()
            value.backward()
            return value

        # Rounds 1-2 use a strong-Wolfe line search; its function values lose precision near
        # the minimum (the Bregman term cancels), so later rounds take gradient-only steps.
        for round_ in range(20):
            opt = torch.optim.LBFGS(
                [theta],
                lr=1.0,
                max_iter=max_iter,
                tolerance_grad=tol / 10,
                tolerance_change=0.0,
                history_size=50,
                line_search_fn="strong_wolfe" if round_ < 2 else None,
            )
            opt.step(closure)
            grad_norm = grads_of(theta.detach(), xi, yi).norm(dim=1)
            if float(grad_norm.max()) <= tol:
                break
        else:
            raise RuntimeError(
                f"PBRF: L-BFGS stopped at gradient norm {float(grad_norm.max()):.3g} > "
                f"tol={tol:g}; raise `max_iter` or `damping`"
            )
        final = theta.detach()

        def measure(t: Tensor) -> Tensor:
            return task.measurement(bind(model, layout.unflatten(t)), (xq, yq))

        with torch.no_grad():
            response = vmap(measure)(final) - measure(theta_s)  # [K, n_query]
    return PBRFResult(response.T.contiguous(), idx, float(epsilon), damping, grad_norm)
