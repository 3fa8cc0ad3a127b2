"""Inner products of per-example gradients, layer by layer, without forming them where possible.

For a block (a supported layer, :mod:`headwater.gradients.layers`) the gradient of
example ``i`` is ``G_i = Σ_t s_it ã_itᵀ``. When the layer sees one position per example
(a ``Linear`` layer on feature vectors) it is an outer product, so

    ⟨G_q, G_i⟩ = (s_q · s_i)(ã_q · ã_i),        ‖G_i‖² = ‖s_i‖² ‖ã_i‖²,

``out + width`` numbers per example instead of ``out · width``: a ``[n_q, n_i]`` tile
costs two small matrix products and an elementwise product, and no ``[n, P]``
gradient matrix is ever held. Blocks with several positions (token sequences,
convolutions) form ``G_i`` (one ``[B, out, width]`` einsum per chunk) and take plain
dot products. The diagonal block (parameters outside supported layers) holds its flat
per-example gradients as ``s`` with ``ã = 1``. The sum over blocks is the dot product of
the full gradients, so the
numbers equal those of :func:`~headwater.gradients.per_example.per_example_gradients`
up to rounding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headwater.data import DataLike, iter_batches
from headwater.gradients.layers import Block, find_blocks
from headwater.gradients.per_example import per_example_gradients
from headwater.methods.factored import module_factors, num_part_rows, part_rows
from headwater.methods.scoring import Features
from headwater.task import Task

__all__ = ["LayerGradients", "layer_blocks"]

_PROBE = 4  # examples whose layer-wise gradient norms are checked against vmap's

Part = tuple[Tensor, Tensor] | Tensor  # (s [N, out], ã [N, width]) or G [N, out·width]


def _full(part: Part) -> Tensor:
    if isinstance(part, Tensor):
        return part
    s, a = part
    return torch.einsum("bo,bi->boi", s, a).flatten(1)


@dataclass(frozen=True)
class LayerGradients(Features):
    """Per-example gradients of ``N`` examples, block by block (see the module docs)."""

    parts: dict[str, Part]

    @classmethod
    def of(cls, factors: dict[str, tuple[Tensor, Tensor]]) -> LayerGradients:
        """From :func:`~headwater.methods.factored.module_factors`' ``{module: (s [B, T, out],
        ã [B, T, width])}``: kept as factors when ``T = 1``, else summed into ``G``."""
        parts: dict[str, Part] = {}
        for module, (s, a) in factors.items():
            parts[module] = (
                (s[:, 0], a[:, 0])
                if s.shape[1] == 1
                else torch.einsum("bto,bti->boi", s, a).flatten(1)
            )
        return cls(parts)

    @classmethod
    def cat(cls, chunks: Sequence[LayerGradients]) -> LayerGradients:
        """The examples of every chunk, in order."""
        parts: dict[str, Part] = {}
        for module in chunks[0].parts:
            pieces = [c.parts[module] for c in chunks]
            if all(isinstance(p, tuple) for p in pieces):
                parts[module] = (
                    torch.cat([p[0] for p in pieces]),
                    torch.cat([p[1] for p in pieces]),
                )
            else:
                parts[module] = torch.cat([_full(p) for p in pieces])
        return cls(parts)

    def __len__(self) -> int:
        return num_part_rows(self.parts)

    def __getitem__(self, rows: slice) -> LayerGradients:
        return LayerGradients(part_rows(self.parts, rows))

    def scaled(self, weights: Tensor) -> LayerGradients:
        """Every example's gradient times ``weights [N]`` (the output factor of a pair)."""
        w = weights.unsqueeze(1)
        return LayerGradients(
            {m: (p[0] * w, p[1]) if isinstance(p, tuple) else p * w for m, p in self.parts.items()}
        )

    def sq_norms(self) -> Tensor:
        """``‖g_i‖²`` over every block, ``[N]``."""
        total = None
        for part in self.parts.values():
            sq = (
                part[0].pow(2).sum(1) * part[1].pow(2).sum(1)
                if isinstance(part, tuple)
                else part.pow(2).sum(1)
            )
            total = sq if total is None else total + sq
        return total

    def dot(self, other: LayerGradients) -> Tensor:
        """``⟨g_q, g_i⟩`` for every pair, ``[N_self, N_other]``."""
        total = None
        for module, mine in self.parts.items():
            theirs = other.parts[module]
            if isinstance(mine, tuple) and isinstance(theirs, tuple):
                tile = (mine[0] @ theirs[0].T) * (mine[1] @ theirs[1].T)
            else:
                tile = _full(mine) @ _full(theirs).T
            total = tile if total is None else total + tile
        return total


def layer_blocks(model: nn.Module, task: Task, probe: DataLike) -> tuple[Block, ...]:
    """The blocks holding every analysed parameter (supported layers, then the diagonal
    block of the others, whose gradients come from ``vmap``), when the layer-wise
    gradients are the whole per-example gradients.

    Hooks see a layer's parameters only through its module's forward, so this checks the
    first few ``probe`` examples' squared gradient norms against ``vmap``'s (a parameter
    also used outside its module, a module whose forward hook never runs).

    Raises:
        ValueError: naming ``gradients`` when the layer-wise gradients would be incomplete.
    """
    params = task.parameters(model)
    blocks = find_blocks(model, params, task, probe)
    few = next(iter_batches(probe, _PROBE, "train"))
    want = (
        next(per_example_gradients(model, task, few, chunk_size=_PROBE, name="train")).pow(2).sum(1)
    )
    try:
        got = LayerGradients.of(
            next(module_factors(model, task, blocks, few, chunk_size=_PROBE, name="train"))
        ).sq_norms()
    except RuntimeError as err:  # e.g. a module whose forward hook never ran
        raise ValueError(f"gradients: the layer-wise gradients cannot be taken: {err}") from err
    if not torch.allclose(got, want, rtol=1e-3, atol=1e-6 * float(want.max())):
        raise ValueError(
            "gradients: the layer-wise gradients miss part of the per-example gradients "
            "(a parameter used outside its module?)"
        )
    return blocks
