"""Functional optimizer steps on flat tensors, equal to ``torch.optim``'s updates.

``optimizer_step(kind, hyper, theta, state, g, lr, count, max_norm)`` maps the
parameters ``theta [P]``, the optimizer state (a tuple of ``[P]`` tensors) and the
batch gradient ``g [P]`` of the weighted batch loss (:func:`batch_objective`) to the
next parameters and state,
with the same arithmetic as the recorded optimizer (up to rounding); ``sgd_pullback`` and
``adam_pullback`` are its VJPs written out, for a batch of adjoints ``[Q, P]`` at once:

- clipping (``max_norm``): ``g ← g · min(1, c / (‖g‖ + 1e-6))`` as in
  ``clip_grad_norm_``; differentiable except where ``‖g‖ + 1e-6 = c`` (the kink).
- SGD: ``d = g + λθ; v ← μ v + d; θ ← θ − η (d + μ v if Nesterov else v)``
  (``v`` starts at 0, equal to torch's first-step ``v = d`` without dampening).
- Adam: ``g ← g + λθ`` (coupled decay); AdamW: ``θ ← θ(1 − ηλ)``; then
  ``m ← β1 m + (1−β1) g``, ``s ← β2 s + (1−β2) g²`` and
  ``θ ← θ − (η / (1−β1^k)) m / (√s / √(1−β2^k) + ε)`` with ``k = count``.
  ``√s`` is not differentiable at ``s = 0`` (a coordinate whose gradient has always
  been exactly 0, so ``m = 0`` too): its derivative is taken as 0 there.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = [
    "adam_coefficients",
    "adam_pullback",
    "batch_objective",
    "check_normalization",
    "clip",
    "clip_pullback",
    "optimizer_step",
    "sgd_pullback",
    "update",
]


def check_normalization(normalization: str) -> str:
    """``normalization`` if it is ``"mean"`` or ``"n"``; else a ValueError naming it."""
    if normalization not in ("mean", "n"):
        raise ValueError(f"normalization: expected 'mean' or 'n', got {normalization!r}")
    return normalization


def batch_objective(weights: Tensor, losses: Tensor, normalization: str = "mean") -> Tensor:
    """The loss of a batch with example weights ``w_B``: ``Σ w_j ℓ_j / Σ w_j`` (``"mean"``:
    a dropped example (weight 0) leaves the mean of the others, as retraining the same
    loop without it would; a batch whose weights sum to 0 gives no data gradient, its
    derivative in ``w`` is then taken as with ``"n"``) or ``Σ w_j ℓ_j / B`` (``"n"``:
    every batch keeps its size, so dropping a share of the data scales the steps down).
    At ``w = 1`` both are the batch mean."""
    total = (weights * losses).sum()
    size = float(losses.shape[0])
    if check_normalization(normalization) == "n":
        return total / size
    mass = weights.sum()
    return total / torch.where(mass > 0, mass, torch.full_like(mass, size))


def clip(g: Tensor, max_norm: float | None) -> Tensor:
    """``g · min(1, c / (‖g‖ + 1e-6))`` (``clip_grad_norm_``'s arithmetic); ``g`` if no ``c``."""
    if max_norm is None:
        return g
    coef = (max_norm / (g.norm() + 1e-6)).clamp(max=1.0)
    return g * coef


def clip_pullback(g: Tensor, max_norm: float | None, adjoint: Tensor) -> Tensor:
    """``adjoint [Q, P] @ ∂clip(g)/∂g``: ``c a`` and, where clipping acts (``c < 1``), the
    rank-one term ``−c/((‖g‖+1e-6)‖g‖) (a·g) g`` of the norm's derivative."""
    if max_norm is None:
        return adjoint
    norm = g.norm()
    coef = max_norm / (norm + 1e-6)
    if coef >= 1:
        return adjoint
    return coef * adjoint - (coef / ((norm + 1e-6) * norm)) * (adjoint @ g)[:, None] * g


def _safe_sqrt(s: Tensor) -> Tensor:
    """``√s`` with derivative 0 (not inf) where ``s = 0``."""
    positive = s > 0
    return torch.where(
        positive, torch.where(positive, s, torch.ones_like(s)).sqrt(), torch.zeros_like(s)
    )


def _sgd(
    hyper: dict[str, Any], theta: Tensor, state: tuple[Tensor, ...], g: Tensor, lr: float
) -> tuple[Tensor, tuple[Tensor, ...]]:
    mu, wd = hyper["momentum"], hyper["weight_decay"]
    d = g + wd * theta if wd else g
    if not mu:
        return theta - lr * d, state
    v = mu * state[0] + d
    step = d + mu * v if hyper["nesterov"] else v
    return theta - lr * step, (v,)


def sgd_pullback(
    hyper: dict[str, Any],
    lr: float,
    a_theta: Tensor,
    a_state: tuple[Tensor, ...],
    *,
    defer: bool = False,
) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
    """The SGD update's pullback by hand, in place on the given adjoints ``[Q, P]``.

    From ``a_θ'``, ``a_v'``: ``ā = a_v' − η(μ if Nesterov else 1) a_θ'`` (total adjoint of
    ``v'``), ``a_d = ā − η a_θ'`` with Nesterov else ``ā``; then ``a_g = a_d``,
    ``a_v = μ ā``, ``a_θ = a_θ' + λ a_d``. Without momentum ``v`` passes through:
    ``a_d = −η a_θ'``. Returns ``(a_θ, a_state, a_g)``; the inputs are overwritten.
    With ``defer`` (heavy ball: ``a_g = ā``) ``a_state[0]`` is ``ā`` itself, the same
    tensor as ``a_g``, and the caller multiplies it by ``μ`` once ``a_g`` is used: no
    ``[Q, P]`` temporary.
    """
    mu, wd = hyper["momentum"], hyper["weight_decay"]
    if not mu:
        a_d = a_theta * (-lr)
        return (a_theta.add_(a_d, alpha=wd) if wd else a_theta), a_state, a_d
    nesterov = hyper["nesterov"]
    a_total = a_state[0].add_(a_theta, alpha=-lr * (mu if nesterov else 1.0))
    a_d = a_total.add(a_theta, alpha=-lr) if nesterov else a_total
    if wd:
        a_theta.add_(a_d, alpha=wd)
    if nesterov:
        return a_theta, (a_total.mul_(mu),), a_d
    return a_theta, (a_total if defer else a_total * mu,), a_d


def _adam(
    kind: str,
    hyper: dict[str, Any],
    theta: Tensor,
    state: tuple[Tensor, ...],
    g: Tensor,
    lr: float,
    count: int,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    (beta1, beta2), eps, wd = hyper["betas"], hyper["eps"], hyper["weight_decay"]
    if wd and kind == "adam":
        g = g + wd * theta
    elif wd:
        theta = theta * (1 - lr * wd)
    m = beta1 * state[0] + (1 - beta1) * g
    s = beta2 * state[1] + (1 - beta2) * g * g
    denom = _safe_sqrt(s) / (1 - beta2**count) ** 0.5 + eps
    return theta - (lr / (1 - beta1**count)) * m / denom, (m, s)


def adam_coefficients(
    kind: str,
    hyper: dict[str, Any],
    theta: Tensor,
    state: tuple[Tensor, ...],
    g: Tensor,
    lr: float,
    count: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ``[P]`` factors of Adam's / AdamW's pullback at ``(θ, (m, s), g)`` (``g``
    clipped), shared by every adjoint row (:func:`adam_pullback`): ``(−α/r,
    α m'/(2 c₂ r² √s')`` (0 where ``s' = 0``), ``2(1−β2) g̃)``."""
    (beta1, beta2), eps, wd = hyper["betas"], hyper["eps"], hyper["weight_decay"]
    if wd and kind == "adam":
        g = g + wd * theta
    m = beta1 * state[0] + (1 - beta1) * g
    root = _safe_sqrt(beta2 * state[1] + (1 - beta2) * g * g)
    c2 = (1 - beta2**count) ** 0.5
    r = root / c2 + eps
    alpha = lr / (1 - beta1**count)
    safe_root = torch.where(root > 0, root, torch.ones_like(root))
    c_s = torch.where(root > 0, alpha * m / (2 * c2 * r * r * safe_root), torch.zeros_like(root))
    return -alpha / r, c_s, 2 * (1 - beta2) * g


def adam_pullback(
    kind: str,
    hyper: dict[str, Any],
    lr: float,
    coefficients: tuple[Tensor, Tensor, Tensor],
    a_theta: Tensor,
    a_state: tuple[Tensor, ...],
    out: Tensor | None = None,
) -> tuple[Tensor, tuple[Tensor, ...], Tensor]:
    """Adam's / AdamW's pullback by hand (``coefficients``: :func:`adam_coefficients` at
    the step's ``(θ, (m, s), g)``), in place on the adjoints ``[Q, P]``.

    With ``r = √s'/c₂ + ε``, ``c₂ = √(1−β2^k)``, ``α = η/(1−β1^k)``:
    ``ā_m = a_m' − (α/r) a_θ'``, ``ā_s = a_s' + α m'/(2 c₂ r² √s') a_θ'`` (0 where
    ``s' = 0``), ``a_g̃ = (1−β1) ā_m + 2(1−β2) g̃ ā_s``, ``a_m = β1 ā_m``, ``a_s = β2 ā_s``;
    Adam: ``a_θ = a_θ' + λ a_g̃``, AdamW: ``a_θ = (1 − ηλ) a_θ'``. Returns
    ``(a_θ, a_state, a_g)``; the inputs are overwritten, ``a_g`` is written into ``out``
    (a reused buffer of the adjoints' shape) when given.
    """
    (beta1, beta2), wd = hyper["betas"], hyper["weight_decay"]
    c_m, c_s, c_g = coefficients
    a_m, a_s = a_state
    a_m.addcmul_(a_theta, c_m)
    a_s.addcmul_(a_theta, c_s)
    a_g = torch.mul(a_m, 1 - beta1, out=out) if out is not None else a_m * (1 - beta1)
    a_g.addcmul_(a_s, c_g)
    a_m.mul_(beta1)
    a_s.mul_(beta2)
    if wd and kind == "adam":
        a_theta.add_(a_g, alpha=wd)
    elif wd:
        a_theta.mul_(1 - lr * wd)
    return a_theta, (a_m, a_s), a_g


def optimizer_step(
    kind: str,
    hyper: dict[str, Any],
    theta: Tensor,
    state: tuple[Tensor, ...],
    g: Tensor,
    lr: float,
    count: int,
    max_norm: float | None,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """One update (module docstring); ``count`` is Adam's step number (from 1)."""
    return update(kind, hyper, theta, state, clip(g, max_norm), lr, count)


def update(
    kind: str,
    hyper: dict[str, Any],
    theta: Tensor,
    state: tuple[Tensor, ...],
    g: Tensor,
    lr: float,
    count: int,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The update from an already clipped gradient (elementwise in the coordinates)."""
    if kind == "sgd":
        return _sgd(hyper, theta, state, g, lr)
    if kind in ("adam", "adamw"):
        return _adam(kind, hyper, theta, state, g, lr, count)
    raise ValueError(f"kind: expected 'sgd', 'adam' or 'adamw', got {kind!r}")
