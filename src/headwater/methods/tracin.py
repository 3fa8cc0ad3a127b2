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
removes the dominance of high-loss, large-gradient examples. A gradient whose norm
is below ``sqrt(eps) · median`` of the training gradients' norms at that checkpoint
(``eps`` of the dtype) counts as zero: its renormalised gradient is 0 rather than
rounding noise lifted to unit length (a fitted example's gradient is zero only up to
the rounding of the forward pass, which depends on the batch shape and the CPU).

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

from headwater.data import DataLike, num_examples
from headwater.gradients.layers import Block
from headwater.gradients.per_example import Objective, per_example_gradients
from headwater.methods.estimator import Estimator, top_k_of
from headwater.methods.factored import module_factors
from headwater.methods.layer_products import LayerGradients, layer_blocks
from headwater.methods.scoring import FeatureLike, Scores, pairwise
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = ["Checkpoint", "TracIn", "run_checkpoints"]


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


def run_checkpoints(run) -> list[Checkpoint]:
    """TracInCP's checkpoints of a run recorded by :class:`~headwater.train.Recorder`: each
    recorded checkpoint after the first, with the mean learning rate of the steps since the
    previous one, standing for those steps (its state: the parameters and the running
    statistics of the BatchNorm layers trained in train mode)."""
    out = []
    for a, b in zip(run.checkpoints[:-1], run.checkpoints[1:], strict=True):
        lr = sum(run.lrs[a.step : b.step]) / (b.step - a.step)
        out.append(Checkpoint({**run.layout.unflatten(b.theta), **b.buffers}, lr, b.step - a.step))
    return out


class TracIn(Estimator):
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

    method = "tracin"

    def __init__(
        self,
        model: nn.Module,
        task: Task,
        checkpoints: Sequence[Checkpoint],
        *,
        renormalize: bool = False,
        gradients: str = "auto",
        chunk_size: int = 64,
        query_chunk: int = 256,
        progress: ProgressFn | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(task, Task):
            raise TypeError(f"task: expected a headwater Task, got {type(task).__name__}")
        checkpoints = list(checkpoints)
        if not checkpoints or not all(isinstance(c, Checkpoint) for c in checkpoints):
            raise ValueError(
                "checkpoints: expected a non-empty list of headwater Checkpoint objects"
            )
        for arg, value in (("chunk_size", chunk_size), ("query_chunk", query_chunk)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{arg}: must be a positive integer, got {value!r}")
        if gradients not in ("auto", "layers", "vmap"):
            raise ValueError(f"gradients: expected 'auto', 'layers' or 'vmap', got {gradients!r}")
        self.model, self.task, self.checkpoints = model, task, checkpoints
        self.renormalize, self.gradients = bool(renormalize), gradients
        self.chunk_size, self.query_chunk, self.progress = chunk_size, query_chunk, progress
        self._checked_blocks: dict[
            int, tuple[Block, ...] | None
        ] = {}  # per checkpoint, see _blocks

    def _models(self) -> Iterator[tuple[Checkpoint, nn.Module]]:
        for c in self.checkpoints:
            member = copy.deepcopy(self.model)
            try:
                member.load_state_dict(dict(c.state))
            except RuntimeError as err:
                raise ValueError(f"checkpoints: a state does not fit the model: {err}") from err
            yield c, member

    def _grads(
        self, model: nn.Module, data: DataLike, objective: Objective, name: str
    ) -> Iterator[Tensor]:
        yield from per_example_gradients(
            model, self.task, data, objective=objective, chunk_size=self.chunk_size, name=name
        )

    def _blocks(self, index: int, member: nn.Module, probe: DataLike) -> tuple[Block, ...] | None:
        """The supported layers holding every analysed parameter, or ``None`` for ``vmap``
        (see :func:`~headwater.methods.layer_products.layer_blocks`); checked once per
        checkpoint ``index`` and remembered."""
        if self.gradients == "vmap":
            return None
        if index not in self._checked_blocks:
            try:
                self._checked_blocks[index] = layer_blocks(member, self.task, probe)
            except ValueError:
                if self.gradients == "layers":
                    raise
                self._checked_blocks[index] = None
        return self._checked_blocks[index]

    def _layers(
        self,
        member: nn.Module,
        blocks: tuple[Block, ...],
        data: DataLike,
        objective: Objective,
        name: str,
    ) -> Iterator[LayerGradients]:
        """The layer-wise gradients of ``data``, chunk by chunk."""
        for factors in module_factors(
            member,
            self.task,
            blocks,
            data,
            objective=objective,
            chunk_size=self.chunk_size,
            name=name,
        ):
            yield LayerGradients.of(factors)

    def _features(
        self,
        member: nn.Module,
        blocks: tuple[Block, ...] | None,
        data: DataLike,
        objective: Objective,
        name: str,
        norms: list[Tensor],
    ) -> Iterator[FeatureLike]:
        """Per-example gradients of ``data`` at one checkpoint, chunk by chunk: layer-wise
        (:class:`~headwater.methods.layer_products.LayerGradients`) with ``blocks``, else flat
        ``vmap`` gradients ``[chunk, P]``; each chunk's gradient norms are appended to ``norms``."""
        chunks = (
            self._grads(member, data, objective, name)
            if blocks is None
            else self._layers(member, blocks, data, objective, name)
        )
        for g in chunks:
            norms.append(g.norm(dim=1) if isinstance(g, Tensor) else g.sq_norms().sqrt())
            yield g

    def scores(self, query: DataLike, train: DataLike) -> Tensor:
        """``Σ_c η_c s_c ∇m(z_q; θ_c)ᵀ∇ℓ(z_i; θ_c)``, ``[n_query, n_train]``, each checkpoint's
        through the one tiled loop (:func:`~headwater.methods.scoring.pairwise`)."""
        return self._scores(query, train, self_influence=False)[0]

    def attribute(
        self,
        query: DataLike,
        train: DataLike,
        *,
        top_k: int | None = None,
        self_influence: bool = False,
    ) -> Scores:
        """As :meth:`Estimator.attribute`, the self-influence from the training gradients'
        norms of the same pass as the scores."""
        values, si = self._scores(query, train, self_influence=self_influence)
        if top_k is None:
            return Scores(values, self_influence=si)
        (top, indices), (low, low_indices) = (
            top_k_of(values, top_k),
            top_k_of(values, top_k, largest=False),
        )
        return Scores(top, indices, si, opponent_values=low, opponent_indices=low_indices)

    def _scores(
        self, query: DataLike, train: DataLike, *, self_influence: bool
    ) -> tuple[Tensor, Tensor | None]:
        """:meth:`scores` and, if asked, :meth:`self_influence`, from one pass per checkpoint."""
        n_train = num_examples(train, "train")
        total: Tensor | None = None
        self_total: Tensor | None = None
        for k, (c, member) in enumerate(self._models()):
            blocks = self._blocks(k, member, train)
            q_norms: list[Tensor] = []
            t_norms: list[Tensor] = []
            queries = list(
                self._features(member, blocks, query, Objective.MEASUREMENT, "query", q_norms)
            )
            left = torch.cat(queries) if blocks is None else LayerGradients.cat(queries)
            part = pairwise(
                left,
                self._features(member, blocks, train, Objective.TRAIN, "train", t_norms),
                n_train,
                query_chunk=self.query_chunk,
            )
            t = torch.cat(t_norms)
            if self.renormalize:  # unit gradients, from the raw products and the norms
                part = (
                    part
                    / _effective_norms(torch.cat(q_norms), t).unsqueeze(1)
                    / _effective_norms(t, t)
                )
            total = c.weight * part if total is None else total + c.weight * part
            if self_influence:
                own = c.weight * self._squared_norms(t)
                self_total = own if self_total is None else self_total + own
            report(self.progress, "tracin checkpoints", k + 1, len(self.checkpoints))
        return total, self_total

    def _squared_norms(self, norms: Tensor) -> Tensor:
        """``‖g‖²`` from the norms; with ``renormalize`` ``‖g/‖g‖‖²``: 1, or 0 below the floor."""
        return (
            torch.isfinite(_effective_norms(norms, norms)).to(norms.dtype)
            if self.renormalize
            else norms.pow(2)
        )

    def self_influence(self, train: DataLike) -> Tensor:
        """``Σ_c η_c s_c ‖∇ℓ(z_i; θ_c)‖²`` per training example ``[n_train]`` (Pruthi et
        al.'s signal for mislabeled examples; constant with ``renormalize``)."""
        total: Tensor | None = None
        for k, (c, member) in enumerate(self._models()):
            norms: list[Tensor] = []
            for _ in self._features(
                member, self._blocks(k, member, train), train, Objective.TRAIN, "train", norms
            ):
                pass
            part = c.weight * self._squared_norms(torch.cat(norms))
            total = part if total is None else total + part
        return total

    def settings(self) -> dict:
        return {
            "method": "tracin",
            "renormalize": self.renormalize,
            "renormalize_floor": "sqrt(eps) * median training gradient norm",
            "gradients": self.gradients,
            "n_checkpoints": len(self.checkpoints),
            "lrs": [c.lr for c in self.checkpoints],
            "steps": [c.steps for c in self.checkpoints],
            "task": self.task.to_dict(),
            "chunk_size": self.chunk_size,
        }


def _effective_norms(norms: Tensor, train_norms: Tensor) -> Tensor:
    """``norms`` with those below ``sqrt(eps) · median(train_norms)`` set to ``inf``, so that
    dividing by them renormalises a gradient to unit length, or to 0 below the floor."""
    floor = math.sqrt(torch.finfo(norms.dtype).eps) * float(train_norms.median())
    return torch.where(norms > floor, norms, torch.full_like(norms, math.inf))
