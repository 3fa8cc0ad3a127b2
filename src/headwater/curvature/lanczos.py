"""Lanczos with full reorthogonalisation: top-k eigenpairs and the curvature's spectrum.

Same use as :class:`~headwater.curvature.arnoldi.Arnoldi` (project gradients onto
the kept eigenvectors; truncated or residual inverse), built with the symmetric
Lanczos recurrence (Lanczos 1950; Golub & Van Loan §10.1) and exposing every Ritz
value as the spectrum. :func:`minibatch_spectrum` compares the top eigenvalues of
mini-batch curvatures with the full-data one (Granziol et al., "Learning rates as
a function of batch size": mini-batch spectra are inflated by sampling noise).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from headwater.curvature._lowrank import LowRankCurvature, krylov_stop, stopped_rank
from headwater.curvature._matfree import BoundOperator
from headwater.curvature.operators import MatrixKind
from headwater.curvature.solvers import MatVec, lanczos
from headwater.data import DataLike, num_examples, subset
from headwater.task import Task

__all__ = ["Lanczos", "LanczosState", "SpectrumComparison", "minibatch_spectrum"]


@dataclass(frozen=True)
class LanczosState:
    """Fitted Lanczos curvature.

    Attributes:
        eigvals: ``[k]`` kept undamped eigenvalues, by ``|λ|`` descending.
        eigvecs: ``[k, P]`` orthonormal eigenvectors (rows).
        ritz_values: ``[m]`` every Ritz value of the ``m``-step run, descending.
        damping: λ.
        floor: ``μ`` of the residual form (see ``LowRankState``).
    """

    eigvals: Tensor
    eigvecs: Tensor
    ritz_values: Tensor
    damping: float
    floor: float = 0.0


class Lanczos(LowRankCurvature):
    """``M ≈ U diag(l) Uᵀ`` from Lanczos with full reorthogonalisation.

    Args:
        rank: eigenpairs kept, by ``|λ|``.
        n_iter: Lanczos steps (``rank <= n_iter <= P``); default ``min(P, 2·rank)``.
        (others as :class:`~headwater.curvature._lowrank.LowRankCurvature`)

    Memory: the Krylov basis, ``n_iter·P`` float64 numbers, during the fit.
    """

    name = "lanczos"
    option = "n_iter"

    @classmethod
    def _state_type(cls) -> type:
        return LanczosState

    def _decompose(
        self,
        matvec: MatVec,
        dim: int,
        dtype: torch.dtype,
        device: torch.device,
        ranks: tuple[int, ...],
        threshold: float,
    ) -> tuple[Tensor, Tensor, dict[str, Any]]:
        self.rank = ranks[-1]
        ritz, vecs, self.info = lanczos(
            matvec,
            dim,
            n_iter=self._steps(dim),
            seed=self.seed,
            dtype=dtype,
            device=device,
            stop=krylov_stop(ranks, threshold),
        )
        self.rank = stopped_rank(ranks, self.info.iterations)
        keep = torch.argsort(ritz.abs(), descending=True)[: self.rank]
        return ritz[keep], vecs[keep].contiguous(), {"ritz_values": ritz.clone()}

    def spectrum(self) -> Tensor:
        """Every Ritz value ``[m]`` of the fit, descending (undamped). The extremes
        converge first; interior values are a smoothed picture of the spectrum."""
        self._check_fitted()
        return self.state.ritz_values


@dataclass(frozen=True)
class SpectrumComparison:
    """Top eigenvalues of the full-data curvature and of mini-batch curvatures.

    Attributes:
        full: ``[top]`` of ``M`` on all the data, descending.
        minibatch: ``[n_batches, top]`` of ``M`` on each mini-batch, descending.
        batch_size: examples per mini-batch.
    """

    full: Tensor
    minibatch: Tensor
    batch_size: int

    @property
    def inflation(self) -> Tensor:
        """``mean over batches of minibatch / full`` per eigenvalue ``[top]`` (> 1: batch noise)."""
        return (self.minibatch / self.full).mean(dim=0)


def minibatch_spectrum(
    model: nn.Module,
    task: Task,
    data: DataLike,
    *,
    batch_size: int,
    n_batches: int = 4,
    top: int = 10,
    n_iter: int = 40,
    kind: MatrixKind | str = MatrixKind.GGN,
    seed: int = 0,
    chunk_size: int = 64,
) -> SpectrumComparison:
    """Top eigenvalues of the curvature on mini-batches vs on all of ``data``.

    Each spectrum is the ``top`` largest Ritz values of an ``n_iter``-step Lanczos
    run (weight decay included, undamped). Mini-batches are disjoint slices of a
    seeded permutation.

    Raises:
        ValueError: naming the argument for bad sizes.
    """
    n = num_examples(data, "data")
    if not isinstance(batch_size, int) or not 1 <= batch_size <= n:
        raise ValueError(f"batch_size: must be an integer in [1, {n}], got {batch_size!r}")
    if not isinstance(n_batches, int) or not 1 <= n_batches <= n // batch_size:
        raise ValueError(
            f"n_batches: must be an integer in [1, {n // batch_size}], got {n_batches!r}"
        )
    kind = MatrixKind(kind)
    op = BoundOperator(model, task, data, kind, chunk_size)
    p = op.layout.num_params
    if not isinstance(top, int) or not 1 <= top <= min(n_iter, p):
        raise ValueError(
            f"top: must be an integer in [1, min(n_iter, P) = {min(n_iter, p)}], got {top!r}"
        )

    def spectrum(matvec: MatVec) -> Tensor:
        vals, _, _ = lanczos(
            matvec, p, n_iter=min(n_iter, p), seed=seed, dtype=op.dtype, device=op.device
        )
        return vals[:top].double()

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    batches = [
        spectrum(op.on(subset(data, order[b * batch_size : (b + 1) * batch_size])))
        for b in range(n_batches)
    ]
    return SpectrumComparison(spectrum(op.matvec), torch.stack(batches), batch_size)
