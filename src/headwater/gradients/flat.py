"""The one place that flattens a parameter dict to a vector ``[P]`` and back."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

__all__ = ["ParamLayout"]


@dataclass(frozen=True)
class ParamLayout:
    """Names, shapes and offsets of the analysed parameters in the flat layout."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def of(cls, params: dict[str, Tensor]) -> ParamLayout:
        return cls(tuple(params), tuple(tuple(p.shape) for p in params.values()))

    @cached_property  # computed once per layout: unflatten runs at every reverse step
    def sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(s) for s in self.shapes)

    @cached_property
    def num_params(self) -> int:
        return sum(self.sizes)

    @cached_property
    def _slices(self) -> tuple[tuple[str, slice], ...]:
        out, start = [], 0
        for name, size in zip(self.names, self.sizes, strict=True):
            out.append((name, slice(start, start + size)))
            start += size
        return tuple(out)

    def slices(self) -> dict[str, slice]:
        return dict(self._slices)

    def flatten(self, tensors: dict[str, Tensor], batch_dims: int = 0) -> Tensor:
        """Concatenate ``{name: [*batch, *shape]}`` into ``[*batch, P]``."""
        parts = []
        for name in self.names:
            t = tensors[name]
            parts.append(t.reshape(*t.shape[:batch_dims], -1))
        return torch.cat(parts, dim=-1)

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        """Split ``[*batch, P]`` into ``{name: [*batch, *shape]}`` (views)."""
        if flat.shape[-1] != self.num_params:
            raise ValueError(
                f"expected a last dimension of {self.num_params}, got {flat.shape[-1]}"
            )
        batch = flat.shape[:-1]
        return {
            name: flat[..., sl].reshape((*batch, *shape))  # a tuple: 0-d parameters too
            for (name, sl), shape in zip(self._slices, self.shapes, strict=True)
        }

    def to_dict(self) -> dict:
        return {"names": list(self.names), "shapes": [list(s) for s in self.shapes]}
