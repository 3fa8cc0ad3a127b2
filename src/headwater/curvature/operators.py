"""Curvature of the mean training objective, as matrix-vector products or dense.

    H = (1/n) Σ_i ∇²ℓ_i + λ_wd I                       (kind="hessian")
    G = (1/n) Σ_i J_iᵀ (∂²ℓ_i/∂f²) J_i + λ_wd I         (kind="ggn")
    F = (1/n) Σ_i ∇ℓ_i ∇ℓ_iᵀ + λ_wd I                  (kind="ef", empirical Fisher)

with λ_wd the task's weight decay. Everything streams over ``data`` in chunks and
works on the flat parameter layout; damping is added by the curvature classes.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, jacrev, jvp, vjp, vmap

from headwater.data import DataLike, iter_batches, num_examples
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import bind, detached, evaluation_mode, prepare_batch
from headwater.gradients.per_example import check_batch, per_example_gradients
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = ["MatrixKind", "curvature_matvec", "dense_curvature"]


class MatrixKind(str, Enum):
    """Which matrix stands for the curvature."""

    HESSIAN = "hessian"
    GGN = "ggn"
    EF = "ef"


def _flat_params(model: nn.Module, task: Task) -> tuple[Tensor, ParamLayout]:
    params = detached(task.parameters(model))
    layout = ParamLayout.of(params)
    return layout.flatten(params).clone(), layout


def _chunk_matvec(model, task, layout, theta, kind, x, y) -> Callable[[Tensor], Tensor]:
    """``V [K, P] -> Σ_{i in chunk} M_i V`` for one chunk (sum, not mean)."""

    def outputs(t: Tensor) -> Tensor:
        return task.output(bind(model, layout.unflatten(t)), x)

    if kind is MatrixKind.HESSIAN:
        g = grad(lambda t: task.loss(outputs(t), y).sum())
        return vmap(lambda v: jvp(g, (theta,), (v,))[1])
    if kind is MatrixKind.GGN:
        out, vjp_fn = vjp(outputs, theta)
        out = out.detach()
        loss_grad = grad(lambda o: task.loss(o, y).sum())

        def ggn_v(v: Tensor) -> Tensor:
            jv = jvp(outputs, (theta,), (v,))[1]  # [B, *out]
            hjv = jvp(loss_grad, (out,), (jv,))[1]
            return vjp_fn(hjv)[0]

        return vmap(ggn_v)
    grads = torch.cat(list(per_example_gradients(model, task, (x, y), chunk_size=x.shape[0])))

    def ef_v(v: Tensor) -> Tensor:
        return (v @ grads.T) @ grads  # [K, P]

    return ef_v


def curvature_matvec(
    model: nn.Module, task: Task, data: DataLike, kind: MatrixKind | str = "ggn",
    *, chunk_size: int = 256,
) -> Callable[[Tensor], Tensor]:
    """A function ``V [K, P] -> M V [K, P]`` for the undamped curvature ``M`` of ``kind``.

    Each call streams once over ``data``; memory is ``O(K·P + chunk·activations)``.
    """
    kind = MatrixKind(kind)
    theta, layout = _flat_params(model, task)
    n = num_examples(data, "train")
    check_batch(model, task, prepare_batch(next(iter_batches(data, 2, "train")), theta), "train")

    def matvec(v: Tensor) -> Tensor:
        squeeze = v.dim() == 1
        v = v.reshape(-1, layout.num_params).to(theta)
        out = torch.zeros_like(v)
        with evaluation_mode(model):
            for batch in iter_batches(data, chunk_size, "train"):
                x, y = prepare_batch(batch, theta)
                out += _chunk_matvec(model, task, layout, theta, kind, x, y)(v).detach()
        out = out / n + task.weight_decay * v
        return out[0] if squeeze else out

    return matvec


def dense_curvature(
    model: nn.Module, task: Task, data: DataLike, kind: MatrixKind | str = "ggn",
    *, chunk_size: int = 64, progress: ProgressFn | None = None,
) -> Tensor:
    """The dense curvature ``[P, P]`` of the mean objective (for small P only)."""
    kind = MatrixKind(kind)
    theta, layout = _flat_params(model, task)
    p = layout.num_params
    n = num_examples(data, "train")
    total = torch.zeros(p, p, dtype=theta.dtype, device=theta.device)
    done = 0
    with evaluation_mode(model):
        for batch in iter_batches(data, chunk_size, "train"):
            x, y = prepare_batch(batch, theta)
            if done == 0:
                check_batch(model, task, (x, y), "train")
            total += _dense_chunk(model, task, layout, theta, kind, x, y)
            done += x.shape[0]
            report(progress, f"dense {kind.value}", done, n)
    total = total / n
    total = 0.5 * (total + total.T)
    return total + task.weight_decay * torch.eye(p, dtype=total.dtype, device=total.device)


def _dense_chunk(model, task, layout, theta, kind, x, y) -> Tensor:
    p = layout.num_params
    if kind is MatrixKind.EF:
        g = torch.cat(list(per_example_gradients(model, task, (x, y), chunk_size=x.shape[0])))
        return g.T @ g
    if kind is MatrixKind.HESSIAN:
        eye = torch.eye(p, dtype=theta.dtype, device=theta.device)
        hvp = _chunk_matvec(model, task, layout, theta, kind, x, y)
        return torch.cat([hvp(eye[i : i + 256]) for i in range(0, p, 256)])

    def out_single(t: Tensor, xi: Tensor) -> Tensor:
        return task.output(bind(model, layout.unflatten(t)), xi.unsqueeze(0)).squeeze(0)

    def loss_single(o: Tensor, yi: Tensor) -> Tensor:
        return task.loss(o.unsqueeze(0), yi.unsqueeze(0)).sum()

    jac = vmap(jacrev(out_single), in_dims=(None, 0))(theta, x)  # [B, *out, P]
    outs = vmap(out_single, in_dims=(None, 0))(theta, x)  # [B, *out]
    h_out = vmap(hessian(loss_single))(outs, y)  # [B, *out, *out]
    b = x.shape[0]
    c = outs[0].numel()
    jac = jac.reshape(b, c, p)
    hj = torch.bmm(h_out.reshape(b, c, c), jac)  # [B, C, P]
    return jac.reshape(b * c, p).T @ hj.reshape(b * c, p)
