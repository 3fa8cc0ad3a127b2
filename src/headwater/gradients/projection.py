"""Seeded random projections of flat gradients to ``k`` dimensions (Johnson–Lindenstrauss).

``Π [k, P]`` has i.i.d. entries ``±1/√k`` (Rademacher) or ``N(0, 1/k)`` (Gaussian), so
``E[Πᵀ Π] = I`` and ``⟨Πx, Πy⟩ ≈ ⟨x, y⟩`` with relative error ``O(1/√k)``. ``Π`` is
never held whole: parameter coordinates are cut into blocks of ``block_size`` and
the block ``b`` of ``Πᵀ`` (``[block_size, k]``) is drawn from its own generator,
seeded by ``(seed, b)`` (NumPy's ``SeedSequence``). So the projection of a coordinate does not depend on how
the gradients are chunked, and memory is ``block_size × k`` (blocks are kept for
reuse only while they fit ``cache_mb``). Used by TRAK (Park et al. 2023) and
LoGra-style data valuation to make per-example gradients small enough to store.
"""

from __future__ import annotations

import math
from enum import Enum

import numpy as np
import torch
from torch import Tensor

__all__ = ["KroneckerProjection", "ProjectionKind", "RandomProjection"]


class ProjectionKind(str, Enum):
    """Distribution of the entries of ``Π``."""

    RADEMACHER = "rademacher"
    GAUSSIAN = "gaussian"


def _check(kind: ProjectionKind | str, seed: int, **sizes: int) -> ProjectionKind:
    """Validate the positive ``sizes`` and ``seed``; return ``kind`` parsed."""
    for arg, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{arg}: must be a positive integer, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed: must be an integer in [0, 2**31), got {seed!r}")
    try:
        return ProjectionKind(kind)
    except ValueError as err:
        raise ValueError(
            f"kind: expected one of {[k.value for k in ProjectionKind]}, got {kind!r}"
        ) from err


def _draw(kind: ProjectionKind, stream: list[int], shape: tuple[int, int]) -> np.ndarray:
    """±1 or N(0, 1) entries (float64) from NumPy's platform-independent stream ``stream``."""
    rng = np.random.default_rng(stream)
    if kind is ProjectionKind.RADEMACHER:
        return rng.integers(0, 2, size=shape, dtype=np.int8).astype(np.float64) * 2 - 1
    return rng.standard_normal(size=shape)


class RandomProjection:
    """``g [B, P] -> Π g [B, k]`` with a seeded, blockwise-generated ``Π``.

    Args:
        dim: ``k``, the projected dimension (> 0).
        kind: ``"rademacher"`` (default) or ``"gaussian"``.
        seed: the same seed gives the same ``Π`` on every machine and chunking.
        block_size: parameter coordinates per generated block of ``Πᵀ``.
        cache_mb: generated blocks are kept while their total stays below this (MiB);
            beyond it they are regenerated on every call (slower, same numbers).
    """

    def __init__(
        self,
        dim: int,
        *,
        kind: ProjectionKind | str = ProjectionKind.RADEMACHER,
        seed: int = 0,
        block_size: int = 4096,
        cache_mb: float = 256.0,
    ):
        self.kind = _check(kind, seed, dim=dim, block_size=block_size)
        if not isinstance(cache_mb, int | float) or cache_mb < 0:
            raise ValueError(f"cache_mb: must be a number >= 0, got {cache_mb!r}")
        self.dim, self.seed, self.block_size, self.cache_mb = dim, seed, block_size, float(cache_mb)
        self._cache: dict[tuple[int, int, torch.dtype, str], Tensor] = {}
        self._cached_bytes = 0

    def settings(self) -> dict:
        return {
            "dim": self.dim,
            "kind": self.kind.value,
            "seed": self.seed,
            "block_size": self.block_size,
        }

    def _block(self, index: int, rows: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        """Rows ``[index·block_size, index·block_size + rows)`` of ``Πᵀ``: ``[rows, k]``."""
        key = (index, rows, dtype, str(device))
        if key in self._cache:
            return self._cache[key]
        values = _draw(self.kind, [self.seed, index], (rows, self.dim))  # one stream per block
        block = (torch.from_numpy(values) / math.sqrt(self.dim)).to(dtype=dtype, device=device)
        size = block.numel() * block.element_size()
        if self._cached_bytes + size <= self.cache_mb * 2**20:
            self._cache[key] = block
            self._cached_bytes += size
        return block

    def _blocks(self, num_params: int, dtype: torch.dtype, device: torch.device):
        for index, start in enumerate(range(0, num_params, self.block_size)):
            rows = min(self.block_size, num_params - start)
            yield slice(start, start + rows), self._block(index, rows, dtype, device)

    def __call__(self, grads: Tensor) -> Tensor:
        """``Π g`` for each row of ``grads [B, P]`` (or one vector ``[P]``): ``[B, k]``."""
        if not isinstance(grads, Tensor) or grads.dim() not in (1, 2):
            raise ValueError(
                f"grads: expected a tensor [B, P] or [P], got {getattr(grads, 'shape', type(grads))}"
            )
        squeeze = grads.dim() == 1
        g = grads.unsqueeze(0) if squeeze else grads
        out = torch.zeros(g.shape[0], self.dim, dtype=g.dtype, device=g.device)
        for cols, block in self._blocks(g.shape[1], g.dtype, g.device):
            out += g[:, cols] @ block
        return out[0] if squeeze else out

    def gram(self, num_params: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """``Π Πᵀ [k, k]`` (close to ``(P/k)·I``), accumulated block by block."""
        out = torch.zeros(self.dim, self.dim, dtype=dtype)
        for _, block in self._blocks(num_params, dtype, torch.device("cpu")):
            out += block.T @ block
        return out

    def matrix(self, num_params: int, dtype: torch.dtype = torch.float64) -> Tensor:
        """The whole ``Π [k, P]`` (for small ``P`` and tests)."""
        return torch.cat(
            [block for _, block in self._blocks(num_params, dtype, torch.device("cpu"))]
        ).T


class KroneckerProjection:
    """Per layer, ``G [out, width] -> P_out G P_inᵀ [k_out, k_in]`` (LoGra; Choe et al. 2024,
    "What is Your Data Worth to GPT?").

    For a layer's per-example gradient ``G = Σ_t s_t ã_tᵀ`` (see
    :mod:`headwater.gradients.layers`) the projection is
    ``Σ_t (P_out s_t)(P_in ã_t)ᵀ``: the gradient itself is never formed, and the cost per
    position is ``out·k_out + width·k_in`` instead of ``out·width·k``. ``P_out ⊗ P_in`` is a
    random projection of ``vec(G)`` with ``E[(P_out ⊗ P_in)ᵀ(P_out ⊗ P_in)] = I``. A side
    no larger than its ``dim`` is kept whole (identity), so a layer with
    ``out <= dim_out`` and ``width <= dim_in`` is not projected at all.

    Args:
        dim_out, dim_in: ``k_out``, ``k_in`` per layer (> 0).
        kind: ``"rademacher"`` (default) or ``"gaussian"`` entries.
        seed: the factors of layer ``j`` are drawn from ``(seed, j, side)`` (drawn again, in a
            fixed sequence, until their rows are independent, so ``P_out ⊗ P_in`` has full rank).
    """

    def __init__(
        self,
        dim_out: int,
        dim_in: int,
        *,
        kind: ProjectionKind | str = ProjectionKind.RADEMACHER,
        seed: int = 0,
    ):
        self.kind = _check(kind, seed, dim_out=dim_out, dim_in=dim_in)
        self.dim_out, self.dim_in, self.seed = dim_out, dim_in, seed
        self._cache: dict[tuple, Tensor] = {}

    def settings(self) -> dict:
        return {
            "dim_out": self.dim_out,
            "dim_in": self.dim_in,
            "kind": self.kind.value,
            "seed": self.seed,
        }

    def factor(self, layer: int, side: int, size: int, dim: int, dtype: torch.dtype) -> Tensor:
        """``[min(dim, size), size]``: the identity when ``size <= dim``, else seeded random."""
        key = (layer, side, size, dim, dtype)
        if key not in self._cache:
            if size <= dim:
                self._cache[key] = torch.eye(size, dtype=dtype)
            else:
                for attempt in range(100):  # small ±1 matrices can have dependent rows: draw again
                    values = _draw(self.kind, [self.seed, layer, side, attempt], (dim, size))
                    if np.linalg.matrix_rank(values) == dim:
                        break
                self._cache[key] = (torch.from_numpy(values) / math.sqrt(dim)).to(dtype)
        return self._cache[key]

    def factors(
        self, layer: int, out: int, width: int, dtype: torch.dtype
    ) -> tuple[Tensor, Tensor]:
        """``(P_out [k_out, out], P_in [k_in, width])`` of layer number ``layer``."""
        return self.factor(layer, 0, out, self.dim_out, dtype), self.factor(
            layer, 1, width, self.dim_in, dtype
        )
