"""TracIn(CP) (Pruthi et al. 2020) and its renormalised form (Hammoudeh & Lowd 2022).

    score[q, i] = Σ_c η_c · s_c · ∇m(z_q; θ_c)ᵀ ∇ℓ(z_i; θ_c)

over checkpoints ``c`` with learning rate ``η_c`` standing for ``s_c`` optimiser
steps. Why ``s_c``: in one SGD step on a mini-batch of ``B`` out of ``n`` examples,
example ``i`` is in the batch with probability ``B/n`` and then moves θ by
``−(η/B)∇ℓ_i``, so each step changes the query by ``(η/n)∇mᵀ∇ℓ_i`` on average when
``i`` is removed. Summed over the steps a checkpoint stands for, removing ``i``
changes ``m(z_q)`` by about ``+score[q, i]/n`` — headwater's one convention
(positive = proponent with the loss as measurement), whatever the batch size.

With ``renormalize=True`` every gradient is divided by its norm at each checkpoint
*before* the products are summed (gradient-aggregated renormalisation), which
removes the dominance of high-loss, large-gradient examples.

By default the products are taken layer by layer from the supported layers' inputs and
output gradients (``nn.Linear``, convolutions, ``Conv1D``, ``nn.Embedding``; the other
parameters' gradients come from ``vmap``:
:class:`~headwater.methods.layer_products.LayerGradients`): a layer that sees one
position per example never forms its per-example gradient. When a check on a few
examples disagrees with ``vmap`` (a weight used outside its module), or with
``gradients="vmap"``, they come from ``vmap``-ed per-example gradients.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from headwater.curvature.kfac_blocks import Block
from headwater.data import DataLike, num_examples
from headwater.gradients.per_example import Objective, per_example_gradients
from headwater.methods.factored import module_factors
from headwater.methods.layer_products import LayerGradients, layer_blocks
from headwater.methods.scoring import pairwise
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = ["Checkpoint", "TracIn"]


@dataclass(frozen=True)
class Checkpoint:
    """A training checkpoint: the model's ``state_dict`` at that point, the learning
    rate in force and the number of optimiser steps it stands for."""

    state: Mapping[str, Tensor]
    lr: float
    steps: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.lr, int | float) or not math.isfinite(self.lr) or self.lr <= 0:
            raise ValueError(f"checkpoints: lr must be a finite float > 0, got {self.lr!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ValueError(f"checkpoints: steps must be a positive integer, got {self.steps!r}")

    @property
    def weight(self) -> float:
        return float(self.lr) * self.steps


class TracIn:
    """TracInCP scores ``[n_query, n_train]`` from a list of checkpoints.

    Args:
        model: the architecture; each checkpoint's state is loaded into a copy
            (the model itself is never modified).
        task: loss, measurement and analysed parameters.
        checkpoints: the :class:`Checkpoint` list (at least one).
        renormalize: divide each gradient by its norm per checkpoint before the dot
            products (Hammoudeh & Lowd 2022).
        gradients: ``"auto"`` (layer by layer when a check on a few examples agrees
            with ``vmap``, else
            ``vmap``), ``"layers"`` (required: raises ``ValueError`` where ``"auto"``
            would fall back) or ``"vmap"``. The numbers are the same up to rounding.
        chunk_size: examples per gradient step; results do not depend on it.
        query_chunk: query rows per scoring tile of the ``vmap`` path.
        progress: optional ``progress(stage, done, total)`` callback.
    """

    def __init__(self, model: nn.Module, task: Task, checkpoints: Sequence[Checkpoint], *,
                 renormalize: bool = False, gradients: str = "auto", chunk_size: int = 64,
                 query_chunk: int = 256, progress: ProgressFn | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(task, Task):
            raise TypeError(f"task: expected a headwater Task, got {type(task).__name__}")
        checkpoints = list(checkpoints)
        if not checkpoints or not all(isinstance(c, Checkpoint) for c in checkpoints):
            raise ValueError("checkpoints: expected a non-empty list of headwater Checkpoint objects")
        for arg, value in (("chunk_size", chunk_size), ("query_chunk", query_chunk)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{arg}: must be a positive integer, got {value!r}")
        if gradients not in ("auto", "layers", "vmap"):
            raise ValueError(f"gradients: expected 'auto', 'layers' or 'vmap', got {gradients!r}")
        self.model, self.task, self.checkpoints = model, task, checkpoints
        self.renormalize, self.gradients = bool(renormalize), gradients
        self.chunk_size, self.query_chunk, self.progress = chunk_size, query_chunk, progress

    def _models(self) -> Iterator[tuple[Checkpoint, nn.Module]]:
        for c in self.checkpoints:
            member = copy.deepcopy(self.model)
            try:
                member.load_state_dict(dict(c.state))
            except RuntimeError as err:
                raise ValueError(f"checkpoints: a state does not fit the model: {err}") from err
            yield c, member

    def _grads(self, model: nn.Module, data: DataLike, objective: Objective, name: str) -> Iterator[Tensor]:
        for g in per_example_gradients(model, self.task, data, objective=objective,
                                       chunk_size=self.chunk_size, name=name):
            yield g / g.norm(dim=1, keepdim=True).clamp_min(1e-30) if self.renormalize else g

    def _blocks(self, member: nn.Module, probe: DataLike) -> tuple[Block, ...] | None:
        """The supported layers holding every analysed parameter, or ``None`` for ``vmap``
        (see :func:`~headwater.methods.layer_products.layer_blocks`)."""
        if self.gradients == "vmap":
            return None
        try:
            return layer_blocks(member, self.task, probe)
        except ValueError:
            if self.gradients == "layers":
                raise
            return None

    def _layers(self, member: nn.Module, blocks: tuple[Block, ...], data: DataLike, objective: Objective,
                name: str) -> Iterator[LayerGradients]:
        """The layer-wise gradients of ``data``, chunk by chunk."""
        for factors in module_factors(member, self.task, blocks, data, objective=objective,
                                      chunk_size=self.chunk_size, name=name):
            yield LayerGradients.of(factors)

    def _layer_scores(self, member: nn.Module, blocks: tuple[Block, ...], query: DataLike, train: DataLike,
                      n_train: int) -> Tensor:
        left = LayerGradients.cat(list(self._layers(member, blocks, query, Objective.MEASUREMENT, "query")))
        left_norms = left.sq_norms().sqrt().clamp_min(1e-30).unsqueeze(1) if self.renormalize else None
        out = None
        col = 0
        for right in self._layers(member, blocks, train, Objective.TRAIN, "train"):
            tile = left.dot(right)
            if out is None:
                out = tile.new_empty(len(left), n_train)
            if self.renormalize:
                tile = tile / left_norms / right.sq_norms().sqrt().clamp_min(1e-30).unsqueeze(0)
            out[:, col : col + tile.shape[1]] = tile
            col += tile.shape[1]
        return out

    def scores(self, query: DataLike, train: DataLike) -> Tensor:
        """``Σ_c η_c s_c ∇m(z_q; θ_c)ᵀ∇ℓ(z_i; θ_c)``, ``[n_query, n_train]``."""
        n_train = num_examples(train, "train")
        total: Tensor | None = None
        for k, (c, member) in enumerate(self._models()):
            blocks = self._blocks(member, train)
            if blocks is not None:
                part = c.weight * self._layer_scores(member, blocks, query, train, n_train)
            else:
                left = c.weight * torch.cat(list(self._grads(member, query, Objective.MEASUREMENT, "query")))
                part = pairwise(left, self._grads(member, train, Objective.TRAIN, "train"), n_train,
                                query_chunk=self.query_chunk)
            total = part if total is None else total + part
            report(self.progress, "tracin checkpoints", k + 1, len(self.checkpoints))
        return total

    def self_influence(self, train: DataLike) -> Tensor:
        """``Σ_c η_c s_c ‖∇ℓ(z_i; θ_c)‖²`` per training example ``[n_train]`` (Pruthi et
        al.'s signal for mislabeled examples; constant with ``renormalize``)."""
        total: Tensor | None = None
        for c, member in self._models():
            blocks = self._blocks(member, train)
            if blocks is not None:
                sq = torch.cat([g.sq_norms() for g in self._layers(member, blocks, train, Objective.TRAIN, "train")])
                if self.renormalize:  # ‖g/‖g‖‖² (0 for a zero gradient, as with vmap)
                    sq = sq / sq.clamp_min(torch.finfo(sq.dtype).tiny)
            else:
                sq = torch.cat([g.pow(2).sum(1) for g in self._grads(member, train, Objective.TRAIN, "train")])
            part = c.weight * sq
            total = part if total is None else total + part
        return total

    def settings(self) -> dict:
        return {"method": "tracin", "renormalize": self.renormalize, "gradients": self.gradients,
                "n_checkpoints": len(self.checkpoints),
                "lrs": [c.lr for c in self.checkpoints], "steps": [c.steps for c in self.checkpoints],
                "task": self.task.to_dict(), "chunk_size": self.chunk_size}
