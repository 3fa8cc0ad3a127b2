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

from headwater.data import Inputs, call_model, split_batch
from headwater.errors import InputError

__all__ = [
    "ClassificationTask",
    "LanguageModelingTask",
    "Measurement",
    "RegressionTask",
    "Seq2SeqTask",
    "Task",
    "check_model",
    "check_task",
    "default_task",
    "model_output",
    "sample_per_example",
    "select_parameters",
    "tied_note",
]

ModelFn = Callable[..., Any]
BatchLike = tuple[Inputs, Tensor] | Mapping[str, Tensor]
"""A batch as the loss entry points take it: ``(inputs, targets)`` or a dict with ``"labels"``."""


def model_output(out: Any) -> Tensor:
    """The tensor a task scores: ``out`` itself, or its ``logits`` (a Hugging Face output
    object or a dict with ``"logits"``)."""
    if isinstance(out, Tensor):
        return out
    logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise TypeError(
        f"the model returned {type(out).__name__}; expected a tensor or an output with "
        "`.logits` (override Task.output for other outputs)"
    )


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
        TypeError: if ``model`` is not an ``nn.Module``.
        ValueError: if nothing is selected or a name matches no parameter.
    """
    check_model(model)
    named = dict(model.named_parameters())
    canonical = _tied_names(model)
    if modules is None:
        chosen = {k: p for k, p in named.items() if p.requires_grad}
        if not chosen:
            raise ValueError("modules: the model has no parameters that require a gradient")
        return chosen
    if isinstance(modules, str):
        modules = [modules]
    chosen = {}
    for prefix in modules:
        hits = {
            canonical.get(k, k): p
            for k, p in dict(model.named_parameters(remove_duplicate=False)).items()
            if k == prefix or k.startswith(prefix + ".")
        }
        if not hits:
            raise ValueError(
                f"modules: {prefix!r} matches no parameter; parameters are e.g. {list(named)[:6]}"
            )
        chosen.update(hits)
    if not chosen:
        raise ValueError("modules: selected no parameters")
    return {k: named[k] for k in named if k in chosen}


def _tied_names(model: nn.Module) -> dict[str, str]:
    """Each alias of a tied parameter (e.g. ``lm_head.weight``) -> the name it is analysed
    under (the first registered, e.g. ``transformer.wte.weight``)."""
    first: dict[int, str] = {}
    aliases = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def tied_note(model: nn.Module, names: Sequence[str]) -> str:
    """`` (x is tied to y, analysed once as y)`` for the tied parameters among ``names``."""
    aliases = _tied_names(model)
    tied = {a: c for a, c in aliases.items() if c in names or a in names}
    return "".join(f"; {a} is tied to {c} (analysed once, as {c})" for a, c in tied.items())


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
        self.modules = (
            None if modules is None else tuple([modules] if isinstance(modules, str) else modules)
        )

    def parameters(self, model: nn.Module) -> dict[str, nn.Parameter]:
        """The analysed parameters of ``model``."""
        return select_parameters(model, self.modules)

    def output(self, model: ModelFn, inputs: Inputs) -> Tensor:
        """The model's output for a batch: ``model(x)``, ``model(*x)`` for a tuple,
        ``model(**x)`` for a dict (without its ``"labels"``), unwrapped to its ``.logits``
        when it is a Hugging Face output (override for anything else)."""
        return model_output(call_model(model, inputs))

    def attention_mask(self, inputs: Inputs) -> Tensor | None:
        """Per-position weights ``[B, T]`` (1 = a real token, 0 = padding) that K-FAC/EK-FAC
        use for their input statistics, or ``None`` (every position counts). Default: the
        ``attention_mask`` of a dict batch (as Hugging Face tokenizers give it), else ``None``."""
        if isinstance(inputs, Mapping) and isinstance(inputs.get("attention_mask"), Tensor):
            return inputs["attention_mask"]
        return None

    @abstractmethod
    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        """Per-example training loss ``[B]`` from the output. Its Hessian in the
        output is the middle factor of the GGN."""

    def sample_targets(
        self, output: Tensor, generator: torch.Generator, targets: Tensor | None = None
    ) -> Tensor:
        """Targets drawn from the model's predictive distribution (true Fisher), shaped like
        the batch's ``targets`` (given so that a task can keep what they leave unscored)."""
        raise NotImplementedError(
            f"{type(self).__name__} cannot sample targets for the true Fisher"
        )

    def train_loss(self, model: ModelFn, batch: BatchLike) -> Tensor:
        """Per-example training loss ``[B]`` of a batch in any form ``headwater.influence``
        takes: an ``(inputs, targets)`` pair or a Hugging Face-style dict batch whose
        ``"labels"`` are the targets (:func:`~headwater.data.split_batch`), so a training
        loop can call ``task.train_loss(model, batch).mean().backward()`` on its own batches."""
        inputs, targets = split_batch(batch)
        return self.loss(self.output(model, inputs), targets)

    def measurement(self, model: ModelFn, batch: BatchLike) -> Tensor:
        """Per-example query measurement ``[B]`` (batch forms as :meth:`train_loss`); the
        default is the training loss."""
        return self.train_loss(model, batch)

    def to_dict(self) -> dict[str, Any]:
        return {
            "task": type(self).__name__,
            "weight_decay": self.weight_decay,
            "modules": self.modules,
        }


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
            raise ValueError(
                f"ClassificationTask expects logits [B, C], got shape {tuple(output.shape)}"
            )
        if targets.is_floating_point() or targets.is_complex():
            raise TypeError(
                f"ClassificationTask: targets must be integer class labels, got {targets.dtype}; "
                "convert them with .long() (or use RegressionTask for real-valued targets)"
            )
        if targets.shape != output.shape[:1]:
            raise ValueError(
                f"ClassificationTask: targets must be class indices of shape [B] = "
                f"({output.shape[0]},), got shape {tuple(targets.shape)} (squeeze a column, "
                "argmax one-hot rows)"
            )
        return F.cross_entropy(output, targets.long(), reduction="none")

    def sample_targets(
        self, output: Tensor, generator: torch.Generator, targets: Tensor | None = None
    ) -> Tensor:
        probs = torch.softmax(output.detach(), dim=-1)
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)

    def measurement(self, model: ModelFn, batch: BatchLike) -> Tensor:
        if self.measure is Measurement.LOSS:
            return self.train_loss(model, batch)
        inputs, targets = split_batch(batch)
        logits = self.output(model, inputs)
        correct = logits.gather(1, targets.long().unsqueeze(1)).squeeze(1)
        others = logits.scatter(1, targets.long().unsqueeze(1), float("-inf"))
        return correct - torch.logsumexp(others, dim=1)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "measurement": self.measure.value}


class RegressionTask(Task):
    """Squared error ``ℓ = ½‖f(x) − y‖²`` per example (the ½ makes the GGN ``JᵀJ``)."""

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        if targets.numel() != output.numel():
            raise ValueError(
                f"RegressionTask: the model's outputs {tuple(output.shape)} and the targets {tuple(targets.shape)} "
                "differ in size"
                + (
                    "; integer class labels pick ClassificationTask: convert them with .long() or "
                    "pass task=ClassificationTask()"
                    if output.dim() == 2 and targets.dim() == 1
                    else ""
                )
            )
        diff = output - targets.reshape(output.shape).to(output.dtype)
        return 0.5 * diff.pow(2).reshape(diff.shape[0], -1).sum(dim=1)

    def sample_targets(
        self, output: Tensor, generator: torch.Generator, targets: Tensor | None = None
    ) -> Tensor:
        noise = torch.randn(
            output.shape, generator=generator, dtype=output.dtype, device=output.device
        )
        return output.detach() + noise


class _TokenTask(Task):
    """Summed token cross-entropy over ``[B, T, V]`` logits and ``[B, T]`` token labels
    (``ignore_index`` unscored), the logits at ``t`` predicting the label at ``t + shift``:
    the shared body of :class:`LanguageModelingTask` (``shift = 1``) and
    :class:`Seq2SeqTask` (``shift = 0``)."""

    shift: int

    def __init__(
        self,
        *,
        ignore_index: int = -100,
        weight_decay: float = 0.0,
        modules: Sequence[str] | None = None,
    ):
        super().__init__(weight_decay=weight_decay, modules=modules)
        if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
            raise TypeError(f"ignore_index: expected an int, got {ignore_index!r}")
        self.ignore_index = ignore_index

    def loss(self, output: Tensor, targets: Tensor) -> Tensor:
        return _token_nll(
            output, targets, self.ignore_index, shift=self.shift, name=type(self).__name__
        )

    def sample_targets(
        self, output: Tensor, generator: torch.Generator, targets: Tensor | None = None
    ) -> Tensor:
        """Each scored position's token drawn from the model; unscored positions (and,
        with ``shift = 1``, the first position, which nothing predicts) stay ``ignore_index``."""
        return _sample_tokens(output, generator, targets, self.ignore_index, shift=self.shift)

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "ignore_index": self.ignore_index}


class LanguageModelingTask(_TokenTask):
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

    Inputs may also be a Hugging Face dict batch (``input_ids``, ``attention_mask``,
    ``labels``): its ``labels`` are the targets and are not passed to the model.

    The GGN's output block is ``V × V`` per position: K-FAC/EK-FAC's ``"auto"``
    estimator samples targets from the model (:meth:`sample_targets`, unscored
    positions stay unscored). Their input factors leave out the positions a dict batch's
    ``attention_mask`` marks as padding (:meth:`Task.attention_mask`).

    Args:
        ignore_index: the label of unscored positions (``-100`` as in PyTorch).
        weight_decay, modules: as :class:`Task`.
    """

    shift = 1  # the logits at t predict the token at t + 1


class Seq2SeqTask(_TokenTask):
    """Token cross-entropy of an encoder-decoder model (T5, BART, ...), summed over each target.

    Inputs are a dict batch ``{"input_ids", "attention_mask", "labels"}`` as Hugging Face
    tokenizers make them (the targets are its ``labels [B, T]``). The labels are passed to
    the model, which shifts them right into the decoder's inputs (teacher forcing); a
    batch that has its own ``decoder_input_ids`` uses those. The logits ``[B, T, V]`` at
    position ``t`` predict ``labels[:, t]`` (no shift here); a label equal to
    ``ignore_index`` (padding) is not scored.

    An example's loss, and the default query measurement, is ``−log p(target | source)
    = Σ_t −log p(y_t | y_<t, source)``: a positive score (proponent) means the training
    pair makes the query's target more likely given its source.

    Args:
        ignore_index: the label of unscored positions (``-100`` as in Hugging Face).
        weight_decay, modules: as :class:`Task`.
    """

    shift = 0  # the decoder's logits at t predict the label at t (the model shifts its inputs)

    def output(self, model: ModelFn, inputs: Inputs) -> Tensor:
        if not isinstance(inputs, Mapping) or not ({"labels", "decoder_input_ids"} & set(inputs)):
            raise TypeError(
                "Seq2SeqTask: inputs must be a dict batch with 'labels' (or 'decoder_input_ids') "
                "for the decoder, e.g. {'input_ids', 'attention_mask', 'labels'}"
            )
        return model_output(call_model(model, inputs, labels=True))


def _token_nll(
    output: Tensor, targets: Tensor, ignore_index: int, *, shift: int, name: str
) -> Tensor:
    """``Σ_t −log p(targets[:, t + shift])`` from the logits at ``t``, per sequence ``[B]``."""
    if output.dim() != 3:
        raise ValueError(f"{name} expects logits [B, T, V], got shape {tuple(output.shape)}")
    if targets.shape != output.shape[:2]:
        raise ValueError(
            f"{name}: targets must be token ids [B, T] = {tuple(output.shape[:2])}, "
            f"got shape {tuple(targets.shape)}"
        )
    t = output.shape[1]
    labels = targets[:, shift:].long()
    per_token = F.cross_entropy(
        output[:, : t - shift].transpose(1, 2), labels, ignore_index=ignore_index, reduction="none"
    )  # [B, T - shift], 0 where unscored
    return per_token.sum(dim=1)


def _sample_tokens(
    output: Tensor,
    generator: torch.Generator,
    targets: Tensor | None,
    ignore_index: int,
    *,
    shift: int,
) -> Tensor:
    b, t, v = output.shape
    logits = output[:, : t - shift].detach()
    probs = torch.softmax(
        logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1
    ).reshape(-1, v)
    drawn = torch.multinomial(probs, 1, generator=generator).reshape(b, t - shift)
    sampled = torch.full((b, t), ignore_index, dtype=torch.long, device=output.device)
    sampled[:, shift:] = drawn
    if targets is not None:
        sampled[targets.reshape(b, t) == ignore_index] = ignore_index
    return sampled


_MASK64 = (1 << 64) - 1


def _example_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for example ``index`` (SplitMix64 of ``seed``, ``index``)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


def sample_per_example(
    task: Task, output: Tensor, targets: Tensor, *, seed: int, first: int, draws: int = 1
) -> list[Tensor]:
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
            rows[k].append(
                task.sample_targets(out[b : b + 1], generator, targets[b : b + 1])
                if with_targets
                else task.sample_targets(out[b : b + 1], generator)
            )
    return [torch.cat(r) for r in rows]


def _takes_targets(task: Task) -> bool:
    """Whether ``task.sample_targets`` accepts the batch's targets (a subclass written for
    the earlier ``sample_targets(output, generator)`` does not)."""
    params = inspect.signature(task.sample_targets).parameters.values()
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 3 or any(
        p.kind is p.VAR_POSITIONAL for p in params
    )


def check_model(model: Any) -> nn.Module:
    """``model`` if it is an ``nn.Module``; else a ``TypeError`` naming ``model``."""
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"model: expected a torch.nn.Module (the trained model), got {type(model).__name__}"
        )
    return model


def check_task(task: Any, name: str = "task") -> Task:
    """``task`` if it is a :class:`Task` instance; else a ``TypeError`` naming ``name`` (a
    task class rather than an instance, a string, ...)."""
    if isinstance(task, Task):
        return task
    if isinstance(task, type) and issubclass(task, Task):
        got = f"the class {task.__name__} (instantiate it: {task.__name__}())"
    else:
        got = f"{type(task).__name__} {task!r}" if isinstance(task, str) else type(task).__name__
    raise TypeError(
        f"{name}: expected a headwater Task instance (e.g. headwater.ClassificationTask()), "
        f"got {got}"
    )


def default_task(
    targets: Tensor,
    *,
    weight_decay: float = 0.0,
    encoder_decoder: bool = False,
    output_shape: Sequence[int] | None = None,
    n: int | None = None,
) -> Task:
    """The task the targets imply: integer labels ``[B]`` → classification; integer token
    labels ``[B, T]`` → :class:`LanguageModelingTask` (or :class:`Seq2SeqTask` for an
    ``encoder_decoder`` model); floating targets → regression.

    Args:
        targets: the targets of (the first examples of) the training data.
        weight_decay: as :class:`Task`.
        encoder_decoder: the model is an encoder-decoder (its token labels: :class:`Seq2SeqTask`).
        output_shape: the shape of the model's output on a batch of the data, when known:
            integer targets ``[B, k]`` for a model with outputs ``[B, C]`` (a classifier given
            a column or one-hot rows of labels) are then refused instead of taken for tokens.
        n: the number of examples (named in messages; default ``len(targets)``).

    Raises:
        InputError: naming ``targets`` for integer labels of a shape no task takes.
        TypeError: naming ``targets`` for a dtype no task takes.
    """
    shape = (targets.shape[0] if n is None else n, *targets.shape[1:])
    if targets.dtype in (
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    ):
        if targets.dim() == 1:
            return ClassificationTask(weight_decay=weight_decay)
        if (
            targets.dim() == 2
            and targets.dtype != torch.bool
            and (output_shape is None or len(output_shape) == 3)
        ):
            return (Seq2SeqTask if encoder_decoder else LanguageModelingTask)(
                weight_decay=weight_decay
            )
        model = (
            ""
            if output_shape is None
            else f" (the model's outputs: [B, {', '.join(map(str, output_shape[1:]))}])"
        )
        raise InputError(
            f"targets: integer labels of shape {shape}{model}; expected shape ({shape[0]},) for "
            f"classification (class indices: squeeze a column, argmax one-hot rows) or "
            f"({shape[0]}, T) token labels for a language model's [B, T, V] logits, or pass "
            "task=headwater.ClassificationTask() or another Task"
        )
    if targets.is_floating_point():
        return RegressionTask(weight_decay=weight_decay)
    raise TypeError(f"targets: cannot choose a task for dtype {targets.dtype}; pass task=")
