"""Per-example gradients with ``torch.func``: ``vmap(grad)`` over chunks of examples.

For example ``z_i`` and analysed parameters θ, row ``i`` is ``∇_θ f(z_i; θ)`` where
``f`` is the training loss or the query measurement, flattened by
:class:`~headwater.gradients.flat.ParamLayout`. Memory is one chunk: ``[chunk, P]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from enum import Enum

import torch
from torch import Tensor, nn
from torch.func import grad

from headwater.data import DataLike, Inputs, describe, iter_batches, num_examples, one_example
from headwater.errors import HeadwaterError, InputError, check_finite_rows
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import (
    bind,
    detached,
    evaluation_mode,
    prepare_batch,
    vmap_examples,
)
from headwater.progress import ProgressFn, report
from headwater.task import Task

__all__ = [
    "Objective",
    "check_batch",
    "output_pullbacks",
    "per_example_gradients",
    "stack_gradients",
]


class Objective(str, Enum):
    """Which per-example function is differentiated."""

    TRAIN = "train"  # the training loss ℓ(z; θ)
    MEASUREMENT = "measurement"  # the query measurement m(z; θ)


def _value_fn(task: Task, objective: Objective):
    return task.train_loss if objective is Objective.TRAIN else task.measurement


def check_batch(
    model: nn.Module,
    task: Task,
    batch: tuple[Inputs, Tensor],
    name: str,
    objective: Objective = Objective.TRAIN,
    offset: int = 0,
) -> Tensor:
    """Evaluate ``task`` on ``batch`` with a readable error when it does not fit.

    Returns the per-example values ``[B]``.

    Raises:
        ValueError: naming ``name`` if the inputs do not fit the model, the task
            returns the wrong shape, or a value is NaN/inf (the task's or the model's own
            ``ValueError``/``TypeError`` gets ``name`` in front).
    """
    params = task.parameters(model)
    fn = bind(model, detached(params))
    try:
        with (
            torch.no_grad(),
            evaluation_mode(model),
        ):  # never a train-mode forward (BatchNorm statistics)
            values = _value_fn(task, objective)(fn, batch)
    except (RuntimeError, IndexError) as err:
        raise InputError(
            f"{name}: inputs of {describe(batch[0])} / targets of shape "
            f"{tuple(batch[1].shape)} do not fit the model or task: {err}"
        ) from err
    except HeadwaterError:
        raise
    except ValueError as err:  # the task's or the model's own check: name the set
        raise InputError(f"{name}: {err}") from err
    except TypeError as err:
        raise TypeError(f"{name}: {err}") from err
    check_values(values, batch[1].shape[0], name, offset)
    return values


def check_values(values: Tensor, batch_size: int, name: str, offset: int = 0) -> None:
    """Raise ``ValueError`` naming ``name`` for a wrong shape or a NaN/inf value."""
    if values.shape != (batch_size,):
        raise InputError(
            f"{name}: the task must return one value per example ([{batch_size}]), "
            f"got shape {tuple(values.shape)}"
        )
    bad = ~torch.isfinite(values)
    if bad.any():
        first = int(bad.nonzero()[0, 0]) + offset
        raise InputError(
            f"{name}: the loss/measurement of example {first} is {values[first - offset].item()} (NaN/inf)"
        )


def per_example_gradients(
    model: nn.Module,
    task: Task,
    data: DataLike,
    *,
    objective: Objective | str = Objective.TRAIN,
    chunk_size: int = 64,
    name: str = "data",
    progress: ProgressFn | None = None,
) -> Iterator[Tensor]:
    """Yield per-example gradients ``[chunk, P]`` of the analysed parameters, in order.

    Args:
        model: the model (left unchanged; evaluated in eval mode).
        task: defines the loss/measurement and the analysed parameters.
        data: an ``(inputs, targets)`` pair, a Dataset or a DataLoader.
        objective: ``"train"`` (training loss) or ``"measurement"``.
        chunk_size: examples per ``vmap`` call; results do not depend on it.
        name: the argument name used in error messages.
        progress: optional ``progress(stage, done, total)`` callback.

    Raises:
        ValueError: for empty data, inputs that do not fit the model, NaN/inf values.
    """
    objective = Objective(objective)
    params = detached(task.parameters(model))
    ref = next(iter(params.values()))
    layout = ParamLayout.of(params)
    value_fn = _value_fn(task, objective)
    total = num_examples(data, name)

    def single(p: dict[str, Tensor], x: Inputs, y: Tensor) -> tuple[Tensor, Tensor]:
        value = value_fn(bind(model, p), (one_example(x), y.unsqueeze(0)))
        total = value.sum()
        return total, total.detach()

    per_example = vmap_examples(grad(single, has_aux=True), in_dims=(None, 0, 0))
    done = 0
    with evaluation_mode(model):
        for batch in iter_batches(data, chunk_size, name):
            x, y = prepare_batch(batch, ref)
            if done == 0:
                check_batch(model, task, (x, y), name, objective)
            try:
                grads, values = per_example(params, x, y)
            except RuntimeError as err:
                raise InputError(
                    f"{name}: could not differentiate the model on this data: {err}"
                ) from err
            check_values(values, y.shape[0], name, done)
            flat = layout.flatten(grads, batch_dims=1)  # [B, P]
            check_finite_rows(flat, what="gradient", name=name, offset=done)
            done += y.shape[0]
            report(progress, f"gradients ({name})", done, total)
            yield flat


def stack_gradients(model: nn.Module, task: Task, data: DataLike, **kwargs) -> Tensor:
    """All per-example gradients ``[N, P]`` at once (small data or small P only)."""
    return torch.cat(list(per_example_gradients(model, task, data, **kwargs)))


def output_pullbacks(
    model: nn.Module, task: Task, params: dict[str, Tensor]
) -> Callable[[Tensor, Tensor], Tensor]:
    """``(x [B, ...], c [B, *output]) -> [B, P]``: for each example ``J_iᵀ c_i``, the gradient
    of ``⟨f(x_i), c_i⟩`` in the (detached) analysed ``params``, flat, vectorised over examples."""
    layout = ParamLayout.of(params)

    def contracted(p: dict[str, Tensor], xi: Inputs, ci: Tensor) -> Tensor:
        return (task.output(bind(model, p), one_example(xi)).reshape(-1) * ci.reshape(-1)).sum()

    per_example = vmap_examples(grad(contracted), in_dims=(None, 0, 0))
    return lambda x, c: layout.flatten(per_example(params, x, c), batch_dims=1)
