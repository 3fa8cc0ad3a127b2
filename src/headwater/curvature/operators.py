"""Curvature of the mean training objective, as matrix-vector products or dense.

    H = (1/n) Σ_i ∇²ℓ_i + λ_wd I                       (kind="hessian")
    G = (1/n) Σ_i J_iᵀ (∂²ℓ_i/∂f²) J_i + λ_wd I         (kind="ggn")
    F = (1/n) Σ_i ∇ℓ_i ∇ℓ_iᵀ + λ_wd I                  (kind="ef", empirical Fisher)

with λ_wd the task's weight decay. Everything streams over ``data`` in chunks and
works on the flat parameter layout; damping is added by the curvature classes.

Under ``torch.distributed`` (see :mod:`headwater.distributed`) every rank passes the
whole ``data``, streams over its shard, and the sums ``Σ_i`` are added across ranks
before the division by the global ``n``: the functions here are then collective.
"""

from __future__ import annotations

from collections.abc import Callable
from enum import Enum

import torch
from torch import Tensor, nn
from torch.func import grad, hessian, jacrev, vjp, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from headwater.data import DataLike, Inputs, iter_batches, num_examples, one_example
from headwater.distributed import all_reduce_sum_, local_batches, shard_range
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import (
    OutputBytes,
    bind,
    detached,
    evaluation_mode,
    prepare_batch,
    vmap_examples,
)
from headwater.gradients.per_example import check_batch, per_example_gradients
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = [
    "CACHE_MB",
    "JACOBIAN_MB",
    "JACOBIAN_MIN_FLOPS",
    "CurvatureProduct",
    "MatrixKind",
    "curvature_matvec",
    "dense_curvature",
]


class MatrixKind(str, Enum):
    """Which matrix stands for the curvature."""

    HESSIAN = "hessian"
    GGN = "ggn"
    EF = "ef"


def _flat_params(model: nn.Module, task: Task) -> tuple[Tensor, ParamLayout]:
    params = detached(task.parameters(model))
    layout = ParamLayout.of(params)
    return layout.flatten(params).clone(), layout


_VMAP_ROWS = 32768  # vectors x examples per vmapped chunk product (measured: 1.8x faster
# than all 200 vectors at once for the digits MLP, chunks of 1000, one thread)

CACHE_MB = 512.0
"""Default budget (MiB) of :func:`curvature_matvec`'s cached per-chunk linearisations."""

JACOBIAN_MB = 1024.0
"""Default budget (MiB) of :func:`curvature_matvec`'s stored per-example output Jacobians
(GGN only): ``n·C·(P + C)`` numbers for ``n`` examples, ``C`` outputs and ``P`` parameters."""

JACOBIAN_MIN_FLOPS = 1.0
"""Stored Jacobians are used only when a forward pass costs at least this many FLOPs per
example per ``C·P``: a product with them costs ``4·C·P`` FLOPs per example and vector,
one through the network at least ``4×`` the forward pass (more with convolutions, whose
vmapped backward passes run well below the machine's matrix-product speed). Measured
(one thread, 1,000 digits, products of 50 vectors; the ratio in brackets): the LeNet CNN
(1.4) 0.11 s with Jacobians against 0.78 s by autograd; the 64-128-64-10 MLP (0.2) 0.54 s
against 0.12 s; logistic regression (0.2) 0.043 s against 0.015 s. A dense network's
ratio is about ``2/C``; weight sharing (convolutions, sequences) raises it."""


def _chunk_matvec(model, task, layout, theta, kind, x, y) -> Callable[[Tensor], Tensor]:
    """``V [K, P] -> Σ_{i in chunk} M_i V`` for one chunk (sum, not mean).

    The chunk is linearised once, here: the returned function only runs the
    backward passes of the stored graphs, so it can be called many times.

    - GGN: ``out, Jᵀ(·) = vjp(f)``; ``J v`` is the vjp of the (linear) map
      ``u -> Jᵀu`` taken at ``u = 0``; ``H_out u`` is the vjp of the output-space
      gradient of the loss (symmetric). ``M v = Jᵀ H_out J v``.
    - Hessian: the vjp of ``∇ℓ`` (symmetric, so ``vjp = Hv``).
    - EF: the per-example gradients ``G [B, P]``; ``M V = (V Gᵀ) G``.
    """

    def outputs(t: Tensor) -> Tensor:
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no double backward
            return task.output(bind(model, layout.unflatten(t)), x)

    if kind is MatrixKind.EF:
        grads = torch.cat(list(per_example_gradients(model, task, (x, y), chunk_size=y.shape[0])))
        return lambda v: (v @ grads.T) @ grads  # [K, P]
    if kind is MatrixKind.HESSIAN:
        _, hvp_fn = vjp(grad(lambda t: task.loss(outputs(t), y).sum()), theta)

        def one(v: Tensor) -> Tensor:
            return hvp_fn(v)[0]

    else:
        out, jt_fn = vjp(outputs, theta)
        _, j_fn = vjp(lambda u: jt_fn(u)[0], torch.zeros_like(out))
        _, h_fn = vjp(grad(lambda o: task.loss(o, y).sum()), out.detach())

        def one(v: Tensor) -> Tensor:
            return jt_fn(h_fn(j_fn(v)[0])[0])[0]

    many = vmap(one)
    return lambda v: one(v[0]).unsqueeze(0) if v.shape[0] == 1 else many(v)


def _jacobians(model, task, layout, theta, x, y) -> tuple[Tensor, Tensor]:
    """Per-example output Jacobians ``J [B, C, P]`` and loss Hessians with respect to the
    outputs ``Λ [B, C, C]`` (``C`` = numbers per example's output, flattened), so that one
    chunk's GGN is ``Σ_i J_iᵀ Λ_i J_i``."""

    def out_single(params: dict[str, Tensor], xi: Inputs) -> Tensor:
        return task.output(bind(model, params), one_example(xi)).squeeze(0)

    def loss_single(o: Tensor, yi: Tensor) -> Tensor:
        return task.loss(o.unsqueeze(0), yi.unsqueeze(0)).sum()

    # differentiated in the parameter dict, flattened after (measured on the digits CNN:
    # 0.26 s for 1,000 examples x 10 outputs, 1.4 s through the flat vector's views)
    params = layout.unflatten(theta)
    jac = vmap_examples(jacrev(out_single), in_dims=(None, 0))(
        params, x
    )  # {name: [B, *out, *shape]}
    outs = vmap_examples(out_single, in_dims=(None, 0))(params, x)  # [B, *out]
    h_out = vmap(hessian(loss_single))(outs, y)  # [B, *out, *out]
    b, c = y.shape[0], outs[0].numel()
    flat = layout.flatten(jac, batch_dims=outs.dim())  # [B, *out, P]
    return flat.reshape(b, c, layout.num_params).detach(), h_out.reshape(b, c, c).detach()


def _jacobian_matvec(model, task, layout, theta, x, y) -> Callable[[Tensor], Tensor]:
    """``V [K, P] -> Σ_{i in chunk} J_iᵀ Λ_i J_i V`` from the chunk's stored Jacobians:
    ``U = V Jᵀ`` (one matrix product), ``Λ_i`` per example, then ``(ΛU) J``."""
    jac, h_out = _jacobians(model, task, layout, theta, x, y)
    b, c, p = jac.shape
    flat = jac.reshape(b * c, p)  # [B·C, P]

    def product(v: Tensor) -> Tensor:
        u = (v @ flat.T).reshape(-1, b, c)  # [K, B, C]
        w = torch.einsum("kbc,bcd->kbd", u, h_out)  # Λ_i is symmetric
        return w.reshape(-1, b * c) @ flat  # [K, P]

    return product


class CurvatureProduct:
    """The callable :func:`curvature_matvec` returns: ``V [K, P] -> M V [K, P]``.

    Attributes:
        method: how each product is computed, with the reason (recorded in the settings of
            the curvatures built on it): ``"jacobian"`` (stored per-example output
            Jacobians, GGN within :data:`JACOBIAN_MB`), ``"autograd (cached)"`` /
            ``"autograd"`` (a backward pass per chunk, the linearisations kept or rebuilt),
            or ``"per-example gradients"`` (EF).
    """

    def __init__(self, fn: Callable[[Tensor], Tensor], method: str):
        self._fn, self.method = fn, method

    def __call__(self, v: Tensor) -> Tensor:
        return self._fn(v)


def _rows(inputs: Inputs) -> int:
    return tree_flatten(inputs)[0][0].shape[0]


def _forward_costs(model, task, layout, theta, kind, x, n: int) -> tuple[float, int, float]:
    """From one forward pass over the chunk ``x``: rough bytes of every chunk's cached
    linearisation over ``n`` examples (4× the tensors of a forward pass: the vjp graph, its
    transpose, outputs; or the EF's per-example gradients), the numbers ``C`` in one
    example's output, and the pass's FLOPs per example."""
    counter = OutputBytes()
    with torch.no_grad(), counter, FlopCounterMode(display=False) as flops:
        out = task.output(bind(model, layout.unflatten(theta)), x)
    outputs = out[0].numel()
    per_example = flops.get_total_flops() / _rows(x)
    if kind is MatrixKind.EF:
        return float(n * layout.num_params * theta.element_size()), outputs, per_example
    return 4.0 * counter.total * n / _rows(x), outputs, per_example


def _product_method(
    kind, linearisation: float, jacobian: float, flop_ratio: float, cache_mb, jacobian_mb
) -> str:
    """Which product :func:`curvature_matvec` uses, and why (byte estimates over this rank's
    examples; ``flop_ratio`` = forward FLOPs per example / ``C·P``)."""
    mib = 2**20
    if kind is MatrixKind.EF:
        return "per-example gradients"
    fits = kind is MatrixKind.GGN and jacobian <= jacobian_mb * mib
    flops = f"forward {flop_ratio:.2g} FLOPs per C·P"
    if fits and flop_ratio >= JACOBIAN_MIN_FLOPS:
        single = "; single vectors by autograd (cached)" if linearisation <= cache_mb * mib else ""
        return (
            f"jacobian: per-example output Jacobians {jacobian / mib:,.0f} MiB "
            f"<= budget {jacobian_mb:g} MiB, {flops} >= {JACOBIAN_MIN_FLOPS:g}{single}"
        )
    skipped = f"; not stored Jacobians: {flops} < {JACOBIAN_MIN_FLOPS:g}" if fits else ""
    if linearisation <= cache_mb * mib:
        return (
            f"autograd (cached): linearisations {linearisation / mib:,.0f} MiB "
            f"<= {cache_mb:g} MiB{skipped}"
        )
    return f"autograd: linearisations {linearisation / mib:,.0f} MiB > {cache_mb:g} MiB{skipped}"


def curvature_matvec(
    model: nn.Module,
    task: Task,
    data: DataLike,
    kind: MatrixKind | str = "ggn",
    *,
    chunk_size: int = 256,
    cache_mb: float = CACHE_MB,
    jacobian_mb: float = JACOBIAN_MB,
) -> CurvatureProduct:
    """A function ``V [K, P] -> M V [K, P]`` for the undamped curvature ``M`` of ``kind``.

    Each call streams once over ``data``, computing each chunk's ``Σ_i M_i V`` by one of
    (the choice and its reason are the result's :attr:`CurvatureProduct.method`):

    - **jacobian** (GGN, when ``n·C·(P + C)`` numbers fit in ``jacobian_mb`` MiB, see
      :data:`JACOBIAN_MB`, and a forward pass is dear enough, see
      :data:`JACOBIAN_MIN_FLOPS`): the per-example output Jacobians ``J_i [C, P]`` and
      output Hessians ``Λ_i [C, C]`` are computed once, on the first call with several
      vectors, and every such product is ``Σ_i J_iᵀ Λ_i (J_i V)``: two matrix products over
      all vectors at once, no pass through the network. Single vectors (memory-bound
      there) take the cached autograd path when its linearisations fit;
    - **autograd**: each chunk's linearisation (the graphs of one forward pass, or the
      EF's per-example gradients) is built on the first call and kept for later calls
      when all of them fit in ``cache_mb`` MiB (estimated from one chunk); otherwise it
      is rebuilt on every call, and memory is ``O(K·P + chunk·activations)`` whatever
      ``n_train`` is. With one vector (``K = 1``, e.g. Lanczos) no ``vmap`` is used; many
      vectors go through each chunk in blocks of about ``32768 / chunk`` rows.

    The choice changes no number beyond rounding. Under ``torch.distributed`` each rank
    streams over its shard of ``data`` (and keeps only its shard's Jacobians or
    linearisations); the per-rank sums ``Σ_i M_i V`` are all-reduced before dividing by
    the global ``n``, so every call is collective.
    """
    kind = MatrixKind(kind)
    theta, layout = _flat_params(model, task)
    n = num_examples(data, "train")
    first = prepare_batch(next(iter_batches(data, min(chunk_size, n), "train")), theta)
    check_batch(model, task, first, "train")
    start, stop = shard_range(n)
    with evaluation_mode(model):
        linearisation, c, flops = _forward_costs(
            model, task, layout, theta, kind, first[0], stop - start
        )
    p = layout.num_params
    jacobian_bytes = float((stop - start) * c * (p + c) * theta.element_size())
    method = _product_method(
        kind, linearisation, jacobian_bytes, flops / (c * p), cache_mb, jacobian_mb
    )
    cache = linearisation <= cache_mb * 2**20

    def chunk_ops(build, keep: bool):
        """Yields ``(op, rows)`` per local chunk, built on the first pass; kept if ``keep``."""
        chunks: list[tuple[Callable[[Tensor], Tensor], int]] = []
        complete = [False]

        def operators():
            if complete[0]:
                yield from chunks
                return
            chunks.clear()
            for batch in local_batches(data, chunk_size, "train"):
                x, y = prepare_batch(batch, theta)
                op = build(x, y)
                if keep:
                    chunks.append(op)
                yield op
            complete[0] = keep

        return operators

    autograd = chunk_ops(
        lambda x, y: (_chunk_matvec(model, task, layout, theta, kind, x, y), y.shape[0]), cache
    )
    jacobians = chunk_ops(  # rows 0: every vector at once
        lambda x, y: (_jacobian_matvec(model, task, layout, theta, x, y), 0), True
    )
    use_jacobian = method.startswith("jacobian")

    def matvec(v: Tensor) -> Tensor:
        squeeze = v.dim() == 1
        v = v.reshape(-1, p).to(theta)
        out = torch.zeros_like(v)
        operators = jacobians if use_jacobian and (v.shape[0] > 1 or not cache) else autograd
        with evaluation_mode(model):
            for op, rows in operators():
                # autograd: [step·rows, width] activations per call; jacobian: all at once
                step = max(1, _VMAP_ROWS // rows) if rows else v.shape[0]
                for i in range(0, v.shape[0], step):
                    out[i : i + step] += op(v[i : i + step]).detach()
        all_reduce_sum_(out)  # Σ over every rank's shard
        out = out / n + task.weight_decay * v
        return out[0] if squeeze else out

    return CurvatureProduct(matvec, method)


def dense_curvature(
    model: nn.Module,
    task: Task,
    data: DataLike,
    kind: MatrixKind | str = "ggn",
    *,
    chunk_size: int = 64,
    progress: ProgressFn | None = None,
) -> Tensor:
    """The dense curvature ``[P, P]`` of the mean objective (for small P only).

    ``(1/n) Σ_i M_i`` summed chunk by chunk; under ``torch.distributed`` each rank sums
    its shard and the ``[P, P]`` sums are all-reduced before dividing by the global
    ``n`` (collective). ``progress`` counts this rank's examples.
    """
    kind = MatrixKind(kind)
    theta, layout = _flat_params(model, task)
    p = layout.num_params
    n = num_examples(data, "train")
    start, stop = shard_range(n)
    total = torch.zeros(p, p, dtype=theta.dtype, device=theta.device)
    done = 0
    with evaluation_mode(model):
        for batch in local_batches(data, chunk_size, "train"):
            x, y = prepare_batch(batch, theta)
            if done == 0:
                check_batch(model, task, (x, y), "train")
            total += _dense_chunk(model, task, layout, theta, kind, x, y)
            done += y.shape[0]
            report(progress, f"dense {kind.value}", done, stop - start)
    all_reduce_sum_(total)  # Σ over every rank's shard
    total = total / n
    total = 0.5 * (total + total.T)
    return total + task.weight_decay * torch.eye(p, dtype=total.dtype, device=total.device)


def _dense_chunk(model, task, layout, theta, kind, x, y) -> Tensor:
    p = layout.num_params
    if kind is MatrixKind.EF:
        g = torch.cat(list(per_example_gradients(model, task, (x, y), chunk_size=y.shape[0])))
        return g.T @ g
    if kind is MatrixKind.HESSIAN:
        eye = torch.eye(p, dtype=theta.dtype, device=theta.device)
        hvp = _chunk_matvec(model, task, layout, theta, kind, x, y)
        return torch.cat([hvp(eye[i : i + 256]) for i in range(0, p, 256)])
    jac, h_out = _jacobians(model, task, layout, theta, x, y)  # [B, C, P], [B, C, C]
    b, c, _ = jac.shape
    hj = torch.bmm(h_out, jac)  # [B, C, P]
    return jac.reshape(b * c, p).T @ hj.reshape(b * c, p)
