"""Dense reference computations by plain autograd loops (slow, obviously right)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.autograd.functional import hessian, jacobian
from torch.func import functional_call
from torch.utils._pytree import tree_flatten, tree_map

from headwater.data import as_tensors
from headwater.task import Task


def _pair(data):
    """``(inputs, targets)``; inputs may be a tensor, a tuple or a dict (a dict batch is split)."""
    return as_tensors(data)


def _n(x) -> int:
    return tree_flatten(x)[0][0].shape[0]


def _row(x, i: int):
    return tree_map(lambda t: t[i : i + 1], x)


def _output(model, task, params, x) -> Tensor:
    return task.output(lambda *a, **k: functional_call(model, params, a, k), x)


def _flat(task: Task, model: nn.Module) -> tuple[list[str], list[tuple[int, ...]], Tensor]:
    params = task.parameters(model)
    names = list(params)
    shapes = [tuple(p.shape) for p in params.values()]
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    return names, shapes, flat


def _unflat(names, shapes, flat: Tensor) -> dict[str, Tensor]:
    out, start = {}, 0
    for n, s in zip(names, shapes, strict=True):
        size = int(torch.tensor(s).prod()) if s else 1
        out[n] = flat[start : start + size].reshape(s)
        start += size
    return out


def loop_gradients(model: nn.Module, task: Task, data, measurement: bool = False) -> Tensor:
    """Per-example gradients ``[N, P]`` by one backward pass per example."""
    x, y = _pair(data)
    params = list(task.parameters(model).values())
    rows = []
    was = model.training
    model.eval()
    for i in range(_n(x)):
        batch = (_row(x, i), y[i : i + 1])
        value = (task.measurement if measurement else task.train_loss)(model, batch).sum()
        grads = torch.autograd.grad(value, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    model.train(was)
    return torch.stack(rows)


def _objective(model, task, data):
    names, shapes, flat = _flat(task, model)
    x, y = _pair(data)

    def f(theta: Tensor) -> Tensor:
        out = _output(model, task, _unflat(names, shapes, theta), x)
        return task.loss(out, y).mean() + 0.5 * task.weight_decay * theta.pow(2).sum()

    return f, flat


def dense_hessian(model: nn.Module, task: Task, data) -> Tensor:
    """Hessian of the mean objective (+ weight decay) by ``torch.autograd.functional.hessian``."""
    model.eval()
    f, flat = _objective(model, task, data)
    return hessian(f, flat)


def dense_ggn(model: nn.Module, task: Task, data) -> Tensor:
    """(1/n) Σ J_iᵀ H_i J_i + wd I with J and H from autograd, one example at a time."""
    model.eval()
    names, shapes, flat = _flat(task, model)
    x, y = _pair(data)
    total = torch.zeros(flat.numel(), flat.numel(), dtype=flat.dtype)
    for i in range(_n(x)):
        shape = _output(model, task, _unflat(names, shapes, flat), _row(x, i)).shape  # [1, *out]

        def out_fn(theta, i=i):
            return _output(model, task, _unflat(names, shapes, theta), _row(x, i)).reshape(-1)

        jac = jacobian(out_fn, flat)  # [C, P]
        out = out_fn(flat).detach()
        h = hessian(
            lambda o, i=i, shape=shape: task.loss(o.reshape(shape), y[i : i + 1]).sum(), out
        )
        total += jac.T @ h @ jac
    return total / _n(x) + task.weight_decay * torch.eye(flat.numel(), dtype=flat.dtype)


def dense_ef(model: nn.Module, task: Task, data) -> Tensor:
    g = loop_gradients(model, task, data)
    return g.T @ g / g.shape[0] + task.weight_decay * torch.eye(g.shape[1], dtype=g.dtype)


def influence_scores(model, task, train, query, matrix: Tensor, damping: float = 0.0) -> Tensor:
    """``G_q (M + λI)⁻¹ G_trᵀ`` by ``torch.linalg.solve``."""
    g_tr = loop_gradients(model, task, train)
    g_q = loop_gradients(model, task, query, measurement=True)
    damped = matrix + damping * torch.eye(matrix.shape[0], dtype=matrix.dtype)
    return g_q @ torch.linalg.solve(damped, g_tr.T)


def assert_close(
    actual: Tensor, expected: Tensor, rtol: float = 1e-6, atol: float = 1e-10, what: str = ""
):
    """``torch.testing.assert_close`` that prints the worst entries on failure."""
    try:
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    except AssertionError:
        diff = (actual - expected).abs().flatten()
        worst = diff.topk(min(5, diff.numel())).indices
        rows = [
            f"  [{int(i)}] got {actual.flatten()[i].item():.6g} want {expected.flatten()[i].item():.6g}"
            for i in worst
        ]
        raise AssertionError(f"{what} differs; worst entries:\n" + "\n".join(rows)) from None
