"""How a model's per-example training loss and query measurement are computed.

A :class:`Task` says, for a batch ``(inputs, targets)``, what the per-example
training loss ``[B]`` and the per-example query measurement ``[B]`` are, which
parameters are analysed, and the L2 coefficient of the training objective

    J(θ) = (1/n) Σ_i ℓ(z_i; θ) + (weight_decay / 2) ‖θ_selected‖².

The library applies every reduction itself; a task never averages over the batch.
"""

from __future__ import annotations

import inspect
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ClassificationTask",
    "LanguageModelingTask",
    "Measurement",
    "RegressionTask",
    "Task",
    "default_task",
    "sample_per_example",
    "select_parameters",
]

ModelFn = Callable[[Tensor], Tensor]


class Measurement(str, Enum):
    """What a query's score measures."""

    LOSS = "loss"
    MARGIN = "margin"  # correct-class logit minus logsumexp of the other logits


def select_parameters(model: nn.Module, modules: Sequence[str] | None) -> dict[str, nn.Parameter]:
    """The analysed parameters of ``model``, by name, in registration order.

    Args:
        model: the user's model.
        modules: names (or name prefixes) of modules/parameters to analyse, e.g.
            ``["fc2"]`` or ``["layers.3.mlp"]``; ``None`` selects every parameter
            that requires a gradient.

    Raises:
        ValueError: if nothing is selected or a name matches no parameter.
    """
    named = dict(model.named_parameters())
    if modules is None:
        chosen = {k: p for k, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError("modules: the model has no parameters that require a gradient")
        return chosen
    if isinstance(modules, str):
        modules = [modules]
    chosen = {}
    for prefix in modules:
        hits = {k: p for k, p in named.items() if k == prefix or k.startswith(prefix + ".")}
        if not hits:
            raise ValueError(
                f"modules: {prefix!r} matches no parameter; parameters are e.g. "
                f"{list(named)[:6]}"
            )
        chosen.update(hits)
    if not chosen:
        raise ValueError("modules: selected no parameters")
    return {k: named[k] for k in named if k in chosen}


class Task(ABC):
    """Per-example loss and measurement of a model (subclass for your own model).

    Args:
        weight_decay: L2 coefficient λ of the objective (the curvature gets +λI;
            retraining uses the same objective). Must be >= 0.
        modules: which parameters are analysed (see :func:`select_parameters`).
    """

    def __init__(self, *, weight_decay: float = 0.0, modules: Sequence[str] | None = None):
        if not isinstance(weight_decay, int | float) or not math.isfinite(weight_decay):
            raise TypeError(f"weight_decay: expected a finite float, got {weight_decay!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay: must be >= 0, got {weight_decay}")
        self.weight_decay = float(weight_decay)
        self.modules = None if modules is None else tuple([modules] if isinstance(modules, str) else modules)

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The analysed parameters of ``model``."""
        return select_parameters(model, self.modules)

    def output(self, model: ModelFn, inputs: Tensor) -> Tensor:
        """The model's output for a batch (override for dict inputs etc.)."""
        return model(inputs)

    def attention_mask(self, inputs: Any) -> Tensor | None:
        """Per-position weights ``[B, T]`` (1 = a real token, 0 = padding) that K-FAC/EK-FAC
        use for their input statistics, or ``None`` (every position counts). Default: the
        ``"attention_mask"`` entry of dict inputs (a Hugging Face batch), else ``None``."""
        if isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), Tensor):
            return inputs["attention_mask"]
        return None

    @abstractmethod
    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        """Per-example training loss ``[B]`` from the output. Its Hessian in the
        output is the middle factor of the GGN."""

    def sample_targets(self, output: Tensor, generator: torch.Generator, targets: Tensor | None = None) -> Tensor:
        """Targets drawn from the model's predictive distribution (true Fisher), shaped like
        the batch's ``targets`` (given so that a task can keep what they leave unscored)."""
        raise NotImplementedError(f"{type(self).__name__} cannot sample targets for the true Fisher")

    def train_loss(self, model: ModelFn, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Per-example training loss ``[B]``."""
        inputs, targets = batch
        return self.loss(self.output(model, inputs), targets)

    def measurement(self, model: ModelFn, batch: tuple[Tensor, Tensor]) -> Tensor:
        """Per-example query measurement ``[B]``; the default is the training loss."""
        return self.train_loss(model, batch)

    def to_dict(self) -> dict[str, Any]:
        return {"task": type(self).__name__, "weight_decay": self.weight_decay, "modules": self.modules}


class ClassificationTask(Task):
    """Softmax cross-entropy; measurement is the loss or the correct-class margin.

    The margin is ``z_y − logsumexp_{c≠y} z_c`` (Park et al. 2023). Note its sign:
    a larger margin is better, a larger loss is worse, so a proponent (positive
    score with the loss) lowers the loss while a positive score with the margin
    means removal *raises* the margin.
    """

    def __init__(
        self,
        *,
        measurement: Measurement | str = Measurement.LOSS,
        weight_decay: float = 0.0,
        modules: Sequence[str] | None = None,
    ):
        super().__init__(weight_decay=weight_decay, modules=modules)
        try:
            self.measure = Measurement(measurement)
        except ValueError as err:
            raise ValueError(
                f"measurement: expected one of {[m.value for m in Measurement]}, got {measurement!r}"
            ) from err

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        if output.dim() != 2:
            raise ValueError(f"ClassificationTask expects logits [B, C], got shape {tuple(output.shape)}")
        return F.cross_entropy(output, targets.long(), reduction="none")

    def sample_targets(self, output: Tensor, generator: torch.Generator, targets: Tensor | None = None) -> Tensor:
        probs = torch.softmax(output.detach(), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def measurement(self, model: ModelFn, batch: tuple[Tensor, Tensor]) -> Tensor:
        if self.measure is Measurement.LOSS:
            return self.train_loss(model, batch)
        inputs, targets = batch
        logits = self.output(model, inputs)
        correct = logits.gather(1, targets.long().unsqueeze(1)).squeeze(1)
        others = logits.scatter(1, targets.long().unsqueeze(1), float("-inf"))
        return correct - torch.logsumexp(others, dim=1)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "measurement": self.measure.value}


class RegressionTask(Task):
    """Squared error ``ℓ = ½‖f(x) − y‖²`` per example (the ½ makes the GGN ``JᵀJ``)."""

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        diff = output - targets.reshape(output.shape).to(output.dtype)
        return 0.5 * diff.pow(2).reshape(diff.shape[0], -1).sum(dim=1)

    def sample_targets(self, output: Tensor, generator: torch.Generator, targets: Tensor | None = None) -> Tensor:
        noise = torch.randn(output.shape, generator=generator, dtype=output.dtype, device=output.device)
        return output.detach() + noise


class LanguageModelingTask(Task):
    """Next-token cross-entropy of a causal language model, summed over each sequence.

    Inputs are token ids ``[B, T]``; the model returns logits ``[B, T, V]`` (or an object
    with a ``.logits`` attribute, as Hugging Face models do). ``targets [B, T]`` are the
    labels aligned with the inputs, like Hugging Face's ``labels``: the logits at
    position ``t`` predict ``targets[:, t + 1]`` (the shift is done here), and a label
    equal to ``ignore_index`` is not scored — the prompt of a prompt/completion pair,
    or padding. Usually ``targets`` is the input ids with those positions replaced.

    A sequence's loss is the sum of its scored tokens' cross-entropies, ``−log p`` of
    its scored tokens: a negative log-likelihood, so the true Fisher (sampled targets)
    estimates the GGN. A model trained on the mean over all tokens of a batch has the
    objective ``(1/tokens per batch) Σ`` of these: the same up to a constant factor.
    The measurement of a query is the same quantity, so with the prompt masked it is
    ``−log p(completion | prompt)``, the query function of Grosse et al. 2023; a
    positive score (proponent) means the training sequence makes the completion more
    likely.

    The GGN's output block is ``V × V`` per position: K-FAC/EK-FAC's ``"auto"``
    estimator samples targets from the model (:meth:`sample_targets`, unscored
    positions stay unscored). Their input factors average over every position; override
    :meth:`Task.attention_mask` to leave padded positions out.

    Args:
        ignore_index: the label of unscored positions (``-100`` as in PyTorch).
        weight_decay, modules: as :class:`Task`.
    """

    def __init__(self, *, ignore_index: int = -100, weight_decay: float = 0.0,
                 modules: Sequence[str] | None = None):
        super().__init__(weight_decay=weight_decay, modules=modules)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
        self.ignore_index = ignore_index

    def output(self, model: ModelFn, inputs: Tensor) -> Tensor:
        out = model(inputs)
        return getattr(out, "logits", out)

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        if output.dim() != 3:
            raise ValueError(f"LanguageModelingTask expects logits [B, T, V], got shape {tuple(output.shape)}")
        if targets.shape != output.shape[:2]:
            raise ValueError(f"LanguageModelingTask: targets must be token ids [B, T] = {tuple(output.shape[:2])}, "
                             f"got shape {tuple(targets.shape)}")
        labels = targets[:, 1:].long()
        per_token = F.cross_entropy(output[:, :-1].transpose(1, 2), labels, ignore_index=self.ignore_index,
                                    reduction="none")  # [B, T-1], 0 where unscored
        return per_token.sum(dim=1)

    def sample_targets(self, output: Tensor, generator: torch.Generator, targets: Tensor | None = None) -> Tensor:
        """Each scored position's next token drawn from the model; unscored ones (and the
        first position, which nothing predicts) stay ``ignore_index``."""
        b, t, v = output.shape
        logits = output[:, :-1].detach()
        probs = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).reshape(-1, v)
        drawn = torch.multinomial(probs, 1, generator=generator).reshape(b, t - 1)
        sampled = torch.full((b, t), self.ignore_index, dtype=torch.long, device=output.device)
        sampled[:, 1:] = drawn
        if targets is not None:
            sampled[targets.reshape(b, t) == self.ignore_index] = self.ignore_index
        return sampled

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "ignore_index": self.ignore_index}


_MASK64 = (1 << 64) - 1


def _example_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for example ``index`` (SplitMix64 of ``seed``, ``index``)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def sample_per_example(task: Task, output: Tensor, targets: Tensor, *, seed: int, first: int,
                       draws: int = 1) -> list[Tensor]:
    """``draws`` sets of targets sampled from the model (``task.sample_targets``), each
    like a batch's targets; example ``first + b`` (its global index in the data) draws
    from its own generator seeded by ``(seed, first + b)``.

    So the samples of an example do not depend on the chunk size, on the order in which
    chunks are visited or on how the data are split between ``torch.distributed``
    ranks: a sampled true-Fisher estimate is the same with one process or several.
    """
    out = output.detach()
    with_targets = _takes_targets(task)
    rows: list[list[Tensor]] = [[] for _ in range(draws)]
    for b in range(out.shape[0]):
        generator = torch.Generator(device=out.device).manual_seed(_example_seed(seed, first + b))
        for k in range(draws):
            rows[k].append(task.sample_targets(out[b : b + 1], generator, targets[b : b + 1]) if with_targets
                           else task.sample_targets(out[b : b + 1], generator))
    return [torch.cat(r) for r in rows]


def _takes_targets(task: Task) -> bool:
    """Whether ``task.sample_targets`` accepts the batch's targets (a subclass written for
    the earlier ``sample_targets(output, generator)`` does not)."""
    params = inspect.signature(task.sample_targets).parameters.values()
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3 or any(
        p.kind is p.VAR_POSITIONAL for p in params)


def default_task(targets: Tensor, *, weight_decay: float = 0.0) -> Task:
    """Classification for integer targets, regression for floating targets."""
    if targets.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool):
        return ClassificationTask(weight_decay=weight_decay)
    if targets.is_floating_point():
        return RegressionTask(weight_decay=weight_decay)
    raise TypeError(f"targets: cannot choose a task for dtype {targets.dtype}; pass task=")
