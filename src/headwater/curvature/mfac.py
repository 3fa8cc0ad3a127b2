"""M-FAC: the inverse of a rank-m empirical (or sampled) Fisher plus damping, matrix-free.

Frantar, Kurtic & Alistarh 2021, "M-FAC: Efficient Matrix-Free Approximations of
Second-Order Information". With a window of ``m`` per-example gradients ``G [m, d]``,

    F̂ = μ I + (1/m) Gᵀ G,     μ = damping + weight_decay,

and by Woodbury, with the Cholesky factorisation ``m μ I + G Gᵀ = L Lᵀ`` and
``W = L⁻¹ G [m, d]``,

    F̂⁻¹ = (1/μ) (I − Wᵀ W),      F̂ = μ I + (1/m) Wᵀ Lᵀ L W.

The paper's recursion ``F̂_i⁻¹ = F̂_{i-1}⁻¹ − F̂_{i-1}⁻¹ g_i g_iᵀ F̂_{i-1}⁻¹ / (m + g_iᵀ F̂_{i-1}⁻¹ g_i)``
builds the same matrix one rank-1 update at a time; its ``m × m`` table of scalar
products is exactly an ``LDLᵀ`` factorisation of ``m μ I + G Gᵀ``, computed here by one
float64 Cholesky: set-up ``O(d m²)``, each product ``O(d m)``. Single entries
``[F̂⁻¹]_ij = (δ_ij − w_i·w_j)/μ`` (``w_j`` the ``j``-th column of ``W``) give the
diagonal of the inverse and Optimal Brain Surgeon pruning scores
``ρ_j = θ_j² / (2 [F̂⁻¹]_jj)`` with the update ``δθ = −θ_j F̂⁻¹ e_j / [F̂⁻¹]_jj``
(Hassibi & Stork 1993). ``block_size`` splits the ``d`` coordinates into contiguous
blocks, each with its own factorisation over the same gradients (a block-diagonal F̂).

``kind="ef"`` uses gradients at the true targets (the empirical Fisher; with the whole
training set as window this is exactly ``Exact(kind="ef")``); ``kind="ggn"`` uses
targets sampled from the model (seeded; a Monte-Carlo true Fisher, the GGN in
expectation for cross-entropy and squared error).

Under ``torch.distributed`` the window's rows are split between ranks as
:func:`~headwater.distributed.shard_range` splits ``m`` examples: each rank computes
its rows of ``G`` (the others zero) and ``G`` is all-reduced (a sum of disjoint rows)
before the factorisation, so every rank holds the same ``W`` and ``L`` (fitting is
collective). With ``kind="ggn"`` each example's targets are sampled from ``seed`` and
its index (:func:`~headwater.task.sample_per_example`), so that estimate, too, is the
same whatever the number of processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from headwater.curvature.base import Curvature, Memory, ProblemSize
from headwater.curvature.defaults import MFAC_RELATIVE_DAMPING, DampingScale
from headwater.curvature.defaults import default_damping as rule
from headwater.curvature.operators import MatrixKind
from headwater.data import DataLike, iter_batches, subset, take
from headwater.distributed import all_reduce_sum_, shard_range, world
from headwater.gradients.functional import bind, detached, evaluation_mode, prepare_batch
from headwater.gradients.per_example import per_example_gradients
from headwater.progress import ProgressFn, report
from headwater.task import Task, sample_per_example

__all__ = ["MFAC", "MFACState"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class MFACState:
    factors: Tensor  # W = L⁻¹ G, [m, P], per block columns
    cholesky: Tensor  # L, [n_blocks, m, m] float64, lower triangular
    block_size: int
    damping: float
    weight_decay: float


class MFAC(Curvature):
    """M-FAC inverse (see the module docs).

    Args:
        n_grads: window size ``m``: the first ``m`` training examples (in data order;
            shuffle beforehand for a random window). ``None``: all of them.
        block_size: coordinates per block; ``None``: one dense block.
        seed: seed of the sampled targets (``kind="ggn"``).
        factor_dtype: storage dtype of ``W``: ``"float64"``, ``"float32"``,
            ``"bfloat16"`` or ``None`` (the parameters' dtype).
        kind: ``"ggn"`` (sampled targets, default) or ``"ef"`` (true targets).
        damping: λ; ``None``: ``MFAC_RELATIVE_DAMPING`` (0.1) ``× trace(F)/d`` (with the
            weight decay in F; a held-out choice, see ``curvature.defaults``).
        chunk_size: examples per per-example-gradient step.

    Raises:
        ValueError: at fit, if ``damping + weight_decay`` is 0 (the Woodbury form needs μ > 0).
    """

    name = "mfac"
    kinds = (MatrixKind.GGN, MatrixKind.EF)

    @classmethod
    def memory(cls, size: ProblemSize) -> Memory:
        """stored m·P·b + 8·m² (W and the Cholesky factor; m = n_train by default); working + m·P·b (G)"""
        m = size.n_train  # the default window: every training example
        return Memory(
            m * size.num_params * size.itemsize + 8 * m * m,
            m * size.num_params * size.itemsize,
            "window of every training gradient (n_grads=None)",
        )

    def __init__(
        self,
        *,
        kind: MatrixKind | str = MatrixKind.GGN,
        damping: float | None = None,
        chunk_size: int = 64,
        n_grads: int | None = None,
        block_size: int | None = None,
        seed: int = 0,
        factor_dtype: str | None = None,
    ):
        super().__init__(kind=kind, damping=damping, chunk_size=chunk_size)
        for arg, value in (("n_grads", n_grads), ("block_size", block_size)):
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise ValueError(f"{arg}: must be a positive integer or None, got {value!r}")
        if not isinstance(seed, int):
            raise TypeError(f"seed: expected an int, got {type(seed).__name__}")
        if factor_dtype is not None and factor_dtype not in _DTYPES:
            raise ValueError(
                f"factor_dtype: expected one of {list(_DTYPES)} or None, got {factor_dtype!r}"
            )
        self.n_grads, self.block_size, self.seed, self.factor_dtype = (
            n_grads,
            block_size,
            seed,
            factor_dtype,
        )

    @classmethod
    def _state_type(cls) -> type:
        return MFACState

    def settings(self) -> dict[str, Any]:
        return {
            **super().settings(),
            "n_grads": self.n_grads,
            "block_size": self.block_size,
            "seed": self.seed,
            "factor_dtype": self.factor_dtype,
        }

    # -- fitting ---------------------------------------------------------------------
    def _window(
        self, model: nn.Module, task: Task, data: DataLike, m: int
    ) -> Iterator[tuple[Tensor, Tensor]]:
        """This rank's rows ``[start, stop)`` of the window of the first ``m`` examples
        (all of them with one process), targets sampled from the model for ``kind="ggn"``."""
        size = world()[1]
        start, stop = shard_range(m)
        if stop == start:
            return
        if size > 1:
            data, m = subset(data, torch.arange(start, stop)), stop - start
        params = detached(task.parameters(model))
        ref = next(iter(params.values()))
        taken = 0
        for batch in iter_batches(data, self.chunk_size, "train"):
            x, y = prepare_batch(batch, ref)
            x, y = take(x, slice(0, m - taken)), y[: m - taken]
            if self.kind is MatrixKind.GGN:
                with torch.no_grad(), evaluation_mode(model):
                    y = sample_per_example(
                        task,
                        task.output(bind(model, params), x),
                        y,
                        seed=self.seed,
                        first=start + taken,
                    )[0]
            taken += y.shape[0]
            yield x, y
            if taken >= m:
                return

    def _fit(
        self, model: nn.Module, task: Task, data: DataLike, progress: ProgressFn | None
    ) -> MFACState:
        m = min(self.n_grads or self.n_examples, self.n_examples)
        p = self.layout.num_params
        size = min(self.block_size or p, p)
        ref = next(iter(task.parameters(model).values()))
        g = torch.zeros(m, p, dtype=torch.float64, device=ref.device)  # [m, P]
        start, stop = shard_range(m)
        row = start
        for x, y in self._window(model, task, data, m):
            for chunk in per_example_gradients(model, task, (x, y), chunk_size=self.chunk_size):
                g[row : row + chunk.shape[0]] = chunk
                row += chunk.shape[0]
            report(progress, "mfac gradients", row - start, stop - start)
        all_reduce_sum_(g)  # every rank's rows (the others are zero)
        damping = self.damping
        if damping is None:
            scale = float(g.square().sum()) / (m * p) + task.weight_decay
            damping = rule(scale, DampingScale.FULL, MFAC_RELATIVE_DAMPING)
        mu = damping + task.weight_decay
        if mu <= 0:
            raise ValueError(
                f"damping: M-FAC needs damping + weight_decay > 0 (Woodbury divides by it), "
                f"got damping={damping}, weight_decay={task.weight_decay}"
            )
        eye = torch.eye(m, dtype=torch.float64, device=g.device)
        chols = []
        for start in range(0, p, size):
            gb = g[:, start : start + size]  # [m, b]
            chol = torch.linalg.cholesky(m * mu * eye + gb @ gb.T)  # [m, m]
            g[:, start : start + size] = torch.linalg.solve_triangular(chol, gb, upper=False)
            chols.append(chol)
        store = _DTYPES.get(self.factor_dtype, ref.dtype)
        return MFACState(
            g.to(store).contiguous(), torch.stack(chols), size, float(damping), task.weight_decay
        )

    # -- reading ---------------------------------------------------------------------
    @property
    def _mu(self) -> float:
        return self.state.damping + self.state.weight_decay

    def _blocks(self) -> Iterator[tuple[slice, Tensor]]:
        s = self.state
        for i, start in enumerate(range(0, s.factors.shape[1], s.block_size)):
            yield slice(start, start + s.block_size), s.cholesky[i]

    def _solve(self, v: Tensor) -> Tensor:
        dtype = torch.promote_types(v.dtype, torch.float32)
        w = self.state.factors.to(v.device, dtype)  # [m, P]
        out = v.to(dtype).clone()
        for cols, _ in self._blocks():
            out[:, cols] -= (out[:, cols] @ w[:, cols].T) @ w[:, cols]
        return (out / self._mu).to(v.dtype)

    def _matvec(self, v: Tensor) -> Tensor:
        dtype = torch.promote_types(v.dtype, torch.float32)
        w = self.state.factors.to(v.device, dtype)
        m = w.shape[0]
        out = self._mu * v.to(dtype)
        for cols, chol in self._blocks():
            chol = chol.to(v.device, dtype)
            coeff = (v[:, cols].to(dtype) @ w[:, cols].T) @ chol.T  # [K, m] = (L W v)ᵀ
            out[:, cols] += (coeff @ chol) @ w[:, cols] / m
        return out.to(v.dtype)

    def inverse_hessian_entry(self, i: int, j: int | None = None) -> float:
        """``[F̂⁻¹]_ij`` (``j=None``: the diagonal entry ``ii``) in ``O(m)``."""
        self._check_fitted()
        p = self.layout.num_params
        j = i if j is None else j
        for arg, value in (("i", i), ("j", j)):
            if not isinstance(value, int) or not 0 <= value < p:
                raise ValueError(f"{arg}: expected an index in [0, {p}), got {value!r}")
        if i // self.state.block_size != j // self.state.block_size:
            return 0.0
        w = self.state.factors.double()
        return (float(i == j) - float(w[:, i] @ w[:, j])) / self._mu

    def inverse_diagonal(self) -> Tensor:
        """``diag(F̂⁻¹) [P]`` in ``O(d m)``."""
        self._check_fitted()
        w = self.state.factors.double()
        return ((1.0 - w.square().sum(0)) / self._mu).to(self.state.factors.dtype)

    def pruning_scores(self, weights: Tensor) -> Tensor:
        """OBS saliencies ``ρ_j = θ_j² / (2 [F̂⁻¹]_jj)`` for flat ``weights [P]``:
        the estimated loss increase of zeroing coordinate ``j`` alone."""
        self._check_fitted()
        p = self.layout.num_params
        if not isinstance(weights, Tensor) or weights.shape != (p,):
            raise ValueError(
                f"weights: expected a Tensor of shape [{p}], got "
                f"{tuple(weights.shape) if isinstance(weights, Tensor) else type(weights)}"
            )
        diag = self.inverse_diagonal().to(weights.device, torch.float64)
        return (weights.double().square() / (2 * diag)).to(weights.dtype)

    def obs_update(self, weights: Tensor, j: int) -> Tensor:
        """OBS change ``δθ = −θ_j F̂⁻¹ e_j / [F̂⁻¹]_jj [P]`` that zeroes coordinate ``j``
        and compensates with the others (``weights + δθ`` has entry ``j`` = 0)."""
        diag = self.inverse_hessian_entry(j)
        e = torch.zeros(1, self.layout.num_params, dtype=weights.dtype, device=weights.device)
        e[0, j] = 1.0
        return -float(weights[j]) * self.solve(e)[0] / diag

    @property
    def window(self) -> int:
        """``m``, the number of gradients held."""
        self._check_fitted()
        return int(self.state.factors.shape[0])
