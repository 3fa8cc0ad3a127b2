"""Diagonal curvature: ``M ≈ diag(M)``, exact for the GGN/empirical Fisher or by Hutchinson.

Exact GGN diagonal: with the output Hessian of example ``i`` written as
``H_i = Σ_c w_c a_c a_cᵀ``,

    diag(G) = (1/n) Σ_i Σ_c w_c (J_iᵀ a_c)²  + λ_wd,

where ``J_iᵀ a_c`` is the per-example gradient of ``⟨f(x_i; θ), a_c⟩``, so one
``vmap(grad)`` per output column suffices (memory ``chunk × P``). For softmax
cross-entropy ``H = diag(p) − ppᵀ = AAᵀ`` with ``A = diag(√p) − p√pᵀ`` (``w = 1``);
for other losses ``a_c, w_c`` are the eigenpairs of ``H_i``. Empirical Fisher:
``(1/n) Σ_i g_i² + λ_wd``. Hutchinson (any kind): ``diag(M) ≈ (1/s) Σ_j z_j ⊙ M z_j``
with seeded Rademacher ``z_j`` (Bekas, Kokiopoulou & Saad 2007).

Under ``torch.distributed`` the sums over examples ``Σ_i`` are computed on each rank's
shard and all-reduced before dividing by the global ``n`` (Hutchinson's products are
all-reduced by :func:`~headwater.curvature.operators.curvature_matvec`); fitting is
collective and gives every rank the diagonal of one process.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import hessian, vmap

from headwater.curvature._matfree import (
    BoundOperator,
    rademacher,
    warn_if_indefinite,
)
from headwater.curvature.base import Curvature, Memory, ProblemSize, default_damping
from headwater.curvature.operators import MatrixKind
from headwater.data import DataLike
from headwater.distributed import all_reduce_sum_, local_batches, shard, shard_range
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import bind, detached, evaluation_mode, prepare_batch
from headwater.gradients.per_example import check_batch, output_pullbacks, per_example_gradients
from headwater.progress import ProgressFn, report
from headwater.task import ClassificationTask, Task

__all__ = ["Diagonal", "DiagonalMethod", "DiagonalState"]

_PROBE_BATCH = 8


class DiagonalMethod(str, Enum):
    """How the diagonal is computed."""

    EXACT = "exact"  # per-example Jacobian rows (GGN) or gradients (EF)
    HUTCHINSON = "hutchinson"  # seeded Rademacher probes of M (any kind)


@dataclass(frozen=True)
class DiagonalState:
    """Fitted diagonal.

    Attributes:
        diagonal: ``[P]`` the diagonal of ``M`` (undamped, weight decay included).
        damping: λ.
    """

    diagonal: Tensor
    damping: float


class Diagonal(Curvature):
    """``solve(v) = v / (diag(M) + λ)``, ``matvec(v) = v ⊙ (diag(M) + λ)``.

    Args:
        method: ``"exact"`` (default; GGN or empirical Fisher) or ``"hutchinson"``.
        probes: Hutchinson probes (error ``O(1/√probes)``).
        seed: seed of the probes.
        (others as :class:`~headwater.curvature.base.Curvature`; the default damping
        uses this diagonal's mean, i.e. trace/P.)

    Raises:
        ValueError: ``method="exact"`` with ``kind="hessian"`` (use Hutchinson).
    """

    name = "diagonal"
    damping_in_state_only = True

    @classmethod
    def memory(cls, size: ProblemSize) -> Memory:
        """stored 8·P"""
        return Memory(8 * size.num_params, 0)

    def __init__(
        self,
        *,
        kind: MatrixKind | str = MatrixKind.GGN,
        damping: float | None = None,
        chunk_size: int = 64,
        method: DiagonalMethod | str = DiagonalMethod.EXACT,
        probes: int = 64,
        seed: int = 0,
    ):
        super().__init__(kind=kind, damping=damping, chunk_size=chunk_size)
        try:
            self.method = DiagonalMethod(method)
        except ValueError as err:
            raise ValueError(
                f"method: expected one of {[m.value for m in DiagonalMethod]}, got {method!r}"
            ) from err
        if self.method is DiagonalMethod.EXACT and self.kind is MatrixKind.HESSIAN:
            raise ValueError(
                "method: the exact diagonal is available for kind='ggn' or 'ef'; use "
                "method='hutchinson' for the Hessian"
            )
        for arg, value, low in (("probes", probes, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{arg}: must be an integer >= {low}, got {value!r}")
        self.probes, self.seed = probes, seed

    @classmethod
    def _state_type(cls) -> type:
        return DiagonalState

    def _fit(
        self, model: nn.Module, task: Task, data: DataLike, progress: ProgressFn | None
    ) -> DiagonalState:
        if self.method is DiagonalMethod.HUTCHINSON:
            diag = self._hutchinson(model, task, data, progress)
        elif self.kind is MatrixKind.EF:
            diag = _ef_diagonal(model, task, data, self.chunk_size, self.n_examples, progress)
        else:
            diag = _ggn_diagonal(model, task, data, self.chunk_size, self.n_examples, progress)
        damping = (
            default_damping(float(diag.double().mean())) if self.damping is None else self.damping
        )
        hint = (
            "Use more `probes`, method='exact' or a larger `damping`."
            if self.method is DiagonalMethod.HUTCHINSON
            else ""
        )
        warn_if_indefinite(
            self.name,
            self.kind,
            float(diag.min()),
            damping,
            what="smallest diagonal entry",
            hint=hint,
        )
        return DiagonalState(diag.contiguous(), float(damping))

    def _hutchinson(
        self, model: nn.Module, task: Task, data: DataLike, progress: ProgressFn | None
    ) -> Tensor:
        op = BoundOperator(model, task, data, self.kind, self.chunk_size)
        p = self.layout.num_params
        total = torch.zeros(p, dtype=torch.float64, device=op.device)
        for start in range(0, self.probes, _PROBE_BATCH):
            z = rademacher(
                min(_PROBE_BATCH, self.probes - start), p, self.seed + start, op.dtype, op.device
            )
            total += (z * op.matvec(z)).double().sum(0)
            report(
                progress,
                "diagonal (hutchinson)",
                min(start + _PROBE_BATCH, self.probes),
                self.probes,
            )
        return (total / self.probes).to(op.dtype)

    def _solve(self, v: Tensor) -> Tensor:
        return v / (self.state.diagonal.to(v.dtype) + self.state.damping)

    def _matvec(self, v: Tensor) -> Tensor:
        return v * (self.state.diagonal.to(v.dtype) + self.state.damping)

    @classmethod
    def preconditioner(cls, kind: MatrixKind, damping: float, chunk_size: int) -> Diagonal:
        """The exact diagonal (GGN/EF) or its Hutchinson estimate (Hessian)."""
        method = "hutchinson" if kind is MatrixKind.HESSIAN else "exact"
        return cls(kind=kind, damping=damping, chunk_size=chunk_size, method=method)

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "method": self.method.value,
            "probes": self.probes,
            "seed": self.seed,
        }


def _output_factors(task: Task, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(a [B, D, C], w [B, C])`` with ``∂²ℓ_i/∂f² = Σ_c w_c a_c a_cᵀ`` per example."""
    b = out.shape[0]
    flat = out.reshape(b, -1)  # [B, D]
    if (
        isinstance(task, ClassificationTask)
        and type(task).loss is ClassificationTask.loss
        and out.dim() == 2
    ):
        p = torch.softmax(flat, dim=1)  # [B, C]
        sq = p.sqrt()
        a = torch.diag_embed(sq) - p.unsqueeze(2) * sq.unsqueeze(1)  # [B, C, C]: diag(√p) − p√pᵀ
        return a, torch.ones_like(p)

    def loss_single(o: Tensor, yi: Tensor) -> Tensor:
        return task.loss(o.reshape(1, *out.shape[1:]), yi.unsqueeze(0)).sum()

    h = vmap(hessian(loss_single))(flat, y)  # [B, D, D]
    w, a = torch.linalg.eigh(0.5 * (h + h.transpose(1, 2)))
    return a, w


def _ef_diagonal(
    model: nn.Module,
    task: Task,
    data: DataLike,
    chunk_size: int,
    n: int,
    progress: ProgressFn | None,
) -> Tensor:
    """``(1/n) Σ_i g_i² + λ_wd`` (squared per-example gradients), streamed over ``data``."""
    ref = next(iter(task.parameters(model).values()))
    total = torch.zeros(
        ParamLayout.of(task.parameters(model)).num_params, dtype=ref.dtype, device=ref.device
    )
    start, stop = shard_range(n)
    if stop > start:
        for g in per_example_gradients(
            model,
            task,
            shard(data, "train"),
            chunk_size=chunk_size,
            name="train",
            progress=progress,
        ):
            total += g.pow(2).sum(0)
    all_reduce_sum_(total)  # Σ over every rank's shard
    return total / n + task.weight_decay


def _ggn_diagonal(
    model: nn.Module,
    task: Task,
    data: DataLike,
    chunk_size: int,
    n: int,
    progress: ProgressFn | None,
) -> Tensor:
    """Exact ``diag(G)`` of the mean objective (with weight decay), streamed over ``data``."""
    params = detached(task.parameters(model))
    ref = next(iter(params.values()))
    layout = ParamLayout.of(params)
    total = torch.zeros(layout.num_params, dtype=ref.dtype, device=ref.device)

    pullback = output_pullbacks(model, task, params)
    start, stop = shard_range(n)
    done = 0
    with evaluation_mode(model):
        for batch in local_batches(data, chunk_size, "train"):
            x, y = prepare_batch(batch, ref)
            if done == 0:
                check_batch(model, task, (x, y), "train")
            with torch.no_grad():
                out = task.output(bind(model, params), x)
            a, w = _output_factors(task, out, y)
            for c in range(a.shape[2]):
                g = pullback(x, a[:, :, c])  # [B, P]
                total += (w[:, c : c + 1] * g.pow(2)).sum(0)
            done += y.shape[0]
            report(progress, "diagonal (ggn)", done, stop - start)
    all_reduce_sum_(total)  # Σ over every rank's shard
    return total / n + task.weight_decay
