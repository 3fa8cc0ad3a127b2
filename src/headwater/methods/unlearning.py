"""Unlearning a set of training examples by one Newton (influence) step.

The model was trained on ``J(θ) = (1/n) Σ_i ℓ_i(θ) + (wd/2)‖θ‖²`` (``wd`` = the
task's weight decay, over the analysed parameters). Removing the ``k`` examples
``S`` leaves the objective of the remaining data, with the same recipe:

    J_{-S}(θ) = (1/(n−k)) Σ_{j∉S} ℓ_j(θ) + (wd/2)‖θ‖².

One Newton step on ``J_{-S}`` from the trained θ̂ (Mehta, Pal, Singh & Ravi 2022,
"Deep Unlearning via Randomized Conditionally Independent Hessians", L-CODEC; the
Newton/influence removal of Koh & Liang 2017 and Guo et al. 2020):

    θ_new = θ̂ − H_{-S}⁻¹ ∇J_{-S}(θ̂).

With ``ℓ̃_i = ℓ_i + (wd/2)‖θ‖²`` (an example's loss plus the regulariser) and the
full gradient zero at θ̂ (``(1/n) Σ_i ∇ℓ_i = −wd·θ̂``),

    ∇J_{-S}(θ̂) = −(1/(n−k)) Σ_{i∈S} ∇ℓ̃_i(θ̂)        (only the removed examples' gradients)
    H_{-S}     = (n·H − Σ_{i∈S} ∇²ℓ̃_i) / (n−k)        (the Hessian of the *remaining* data)

with ``H`` the Hessian of ``J`` at θ̂; for one example ``H_{-S} = (nH − ∇²ℓ̃_i)/(n−1)``,
the paper's ``+1/(n−1)`` form. So ``θ_new = θ̂ + (nH − Σ_S ∇²ℓ̃_i)⁻¹ Σ_S ∇ℓ̃_i``. On a
strongly convex objective it matches retraining on the remaining data up to the
second-order remainder of Newton's method. Only the analysed parameters
(``Task(modules=...)``, the paper's selected subset) move; the rest stay as they are.
The paper's optional noise for certified removal is not implemented.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from enum import Enum

import torch
from torch import Tensor, nn

from headwater.curvature.base import Curvature
from headwater.curvature.exact import Exact
from headwater.curvature.operators import MatrixKind, curvature_matvec
from headwater.curvature.solvers import conjugate_gradient
from headwater.data import DataLike, check_indices, num_examples, subset
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import detached
from headwater.gradients.per_example import per_example_gradients
from headwater.task import Task

__all__ = ["UnlearnGradient", "unlearn"]


class UnlearnGradient(str, Enum):
    """How ``∇J_{-S}(θ̂)`` is computed."""

    REMOVED = "removed"  # from the removed examples only (assumes θ̂ minimises J)
    REMAINING = "remaining"  # from every remaining example (exact even if θ̂ is not a minimum)


def _forget_indices(forget: Sequence[int] | Tensor, n: int) -> Tensor:
    idx = check_indices(forget, n, "forget")
    if idx.unique().numel() != idx.numel():
        raise ValueError("forget: indices must be distinct")
    if idx.numel() >= n:
        raise ValueError(f"forget: must leave at least one of the {n} training examples")
    return idx


def _gradient_sum(
    model: nn.Module, task: Task, data: DataLike, chunk_size: int, name: str
) -> Tensor:
    total = None
    for g in per_example_gradients(model, task, data, chunk_size=chunk_size, name=name):
        part = g.sum(dim=0)  # [P]
        total = part if total is None else total + part
    return total


def _newton_rhs(model, task, train, idx, keep, theta, gradient, chunk_size) -> Tensor:
    """``−∇J_{-S}(θ̂)`` ``[P]``."""
    n, k = keep.numel() + idx.numel(), idx.numel()
    if gradient is UnlearnGradient.REMOVED:
        g_removed = _gradient_sum(model, task, subset(train, idx), chunk_size, "forget")
        return (g_removed + k * task.weight_decay * theta) / (n - k)
    g_kept = _gradient_sum(model, task, subset(train, keep), chunk_size, "train")
    return -(g_kept / (n - k) + task.weight_decay * theta)


def _cg(matvec, rhs: Tensor, preconditioner, tol: float, max_iter: int | None, what: str) -> Tensor:
    try:
        x, info = conjugate_gradient(
            matvec, rhs.unsqueeze(0), tol=tol, max_iter=max_iter, preconditioner=preconditioner
        )
    except ValueError as err:
        raise ValueError(
            f"curvature: {what} is not positive definite at the trained parameters ({err}); pass a "
            "fitted curvature with kind='ggn' and damping > 0"
        ) from err
    if not info.converged:
        raise RuntimeError(
            f"unlearn: CG on {what} stopped at relative residual {float(info.residuals.max()):.3g} > "
            f"tol={tol:g} after {info.iterations} iterations; raise `max_iter` or loosen `tol`"
        )
    return x[0]


def unlearn(
    model: nn.Module,
    task: Task,
    train: DataLike,
    forget: Sequence[int] | Tensor,
    *,
    curvature: Curvature | None = None,
    kind: MatrixKind | str = MatrixKind.HESSIAN,
    correction: bool = True,
    gradient: UnlearnGradient | str = UnlearnGradient.REMOVED,
    tol: float = 1e-10,
    max_iter: int | None = None,
    chunk_size: int = 64,
) -> nn.Module:
    """A copy of ``model`` with the examples ``forget`` removed by one Newton step.

    ``θ_new = θ̂ + H_{-S}⁻¹ (1/(n−k)) Σ_{i∈S} ∇ℓ̃_i(θ̂)`` on the analysed parameters
    (see the module docstring for the derivation; Mehta et al. 2022). ``H_{-S}`` is

    - ``curvature=None``: the exact curvature of ``kind`` (default the Hessian) of the
      remaining objective ``J_{-S}``, applied by Hessian-vector products over the
      remaining data and inverted by CG to ``tol``;
    - a fitted exact ``curvature`` (``Exact``, or CG/LiSSA, whose operator is exact) of
      the full data: ``(n·(M + λI) − Σ_{i∈S} (∇²ℓ_i + wd·I))/(n−k)`` with the removed
      examples' exact curvature (of the curvature's ``kind``) subtracted, inverted by
      CG preconditioned with ``((n−k)/n)·(M + λI)⁻¹``;
    - a fitted approximate ``curvature`` (``EKFAC``, ``KFAC``, low-rank, diagonal, ...):
      a copy with the same settings refitted on the remaining data, so ``H_{-S}`` is
      the same approximation of ``J_{-S}`` (subtracting exact per-example curvature
      from an approximation can make it indefinite);
    - with ``correction=False``: simply ``H_{-S} ≈ M + λI`` (the plain influence
      step, no CG, no refit).

    Args:
        model: the trained model (never modified).
        task: the training loss, weight decay and the analysed parameters — only
            those change (``Task(modules=[...])`` selects a subset).
        train: the full training set the model was trained on (``n`` examples).
        forget: indices into ``train`` of the ``k`` examples to remove (distinct, ``k < n``).
        curvature: ``None`` for the exact remaining curvature, or a curvature fitted
            on ``model``, ``task`` and all of ``train``.
        kind: matrix kind of the exact remaining curvature (``curvature=None`` only);
            ``"ggn"`` for non-convex models.
        correction: make a fitted ``curvature`` that of the remaining data (subtract the
            removed examples' curvature from an exact one, refit an approximate one).
        gradient: ``"removed"`` (default; the removed examples' gradients, valid when
            θ̂ minimises the training objective) or ``"remaining"`` (the exact gradient
            of ``J_{-S}`` at θ̂ over the remaining data: a true Newton step even
            when training stopped early).
        tol: relative residual at which CG stops.
        max_iter: CG iteration cap (default ``10·P``).
        chunk_size: examples per vectorised gradient / curvature step.

    Returns:
        A new model (a deep copy of ``model``) whose analysed parameters are θ_new.

    Raises:
        TypeError/ValueError: naming the argument (bad ``forget``, an unfitted or
            mismatched ``curvature``, a non positive-definite curvature).
        RuntimeError: if CG does not reach ``tol`` within ``max_iter``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(task, Task):
        raise TypeError(f"task: expected a headwater Task, got {type(task).__name__}")
    try:
        gradient = UnlearnGradient(gradient)
    except ValueError as err:
        raise ValueError(
            f"gradient: expected one of {[g.value for g in UnlearnGradient]}, got {gradient!r}"
        ) from err
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
    n = num_examples(train, "train")
    idx = _forget_indices(forget, n)
    k = idx.numel()
    mask = torch.ones(n, dtype=torch.bool)
    mask[idx] = False
    keep = mask.nonzero().squeeze(1)
    params = detached(task.parameters(model))
    layout = ParamLayout.of(params)
    theta = layout.flatten(params).clone()  # [P]
    rhs = _newton_rhs(model, task, train, idx, keep, theta, gradient, chunk_size)  # [P]

    if curvature is None:
        matvec = curvature_matvec(
            model, task, subset(train, keep), MatrixKind(kind), chunk_size=chunk_size
        )
        step = _cg(matvec, rhs, None, tol, max_iter, "the remaining curvature")
    else:
        if not isinstance(curvature, Curvature):
            raise TypeError(
                f"curvature: expected a headwater Curvature or None, got {type(curvature).__name__}"
            )
        if curvature.state is None:
            raise ValueError("curvature: not fitted; call curvature.fit(model, task, train) first")
        if curvature.layout != layout:
            raise ValueError(
                f"curvature: fitted on parameters {list(curvature.layout.names)}, but "
                f"model/task select {list(layout.names)}"
            )
        if curvature.n_examples != n:
            raise ValueError(
                f"curvature: fitted on {curvature.n_examples} examples, but train has {n}; "
                "fit it on the full training set"
            )
        if not correction:
            step = curvature.solve(rhs)
        elif not (isinstance(curvature, Exact) or curvature.solve_streams_data):
            # an approximation (K-FAC, EK-FAC, low-rank, diagonal, ...): the exact curvature of
            # the removed examples is not part of it, and subtracting it can leave an indefinite
            # matrix (measured: 10x overshoot with EK-FAC on the digits logistic regression);
            # the same approximation of the remaining data is the consistent H_{-S}
            state, curvature.state = (
                curvature.state,
                None,
            )  # copy the settings, not the fitted state
            try:
                refit = copy.deepcopy(curvature)
            finally:
                curvature.state = state
            step = refit.fit(model, task, subset(train, keep)).solve(rhs)
        else:
            removed = curvature_matvec(
                model, task, subset(train, idx), curvature.kind, chunk_size=chunk_size
            )

            def remaining(v: Tensor) -> Tensor:  # [K, P] -> H_{-S} V
                return (n * curvature.matvec(v) - k * removed(v)) / (n - k)

            def precondition(v: Tensor) -> Tensor:
                return curvature.solve(v) * ((n - k) / n)

            step = _cg(
                remaining, rhs, precondition, tol, max_iter, "the corrected remaining curvature"
            )

    new_flat = layout.unflatten(theta + step.to(theta))
    fresh = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in task.parameters(fresh).items():
            p.copy_(new_flat[name])
    return fresh
