"""Per-example Jacobians of the model's output in the analysed parameters.

For inputs ``x_b`` and analysed parameters θ (flat layout, see
:class:`~headwater.gradients.flat.ParamLayout`), yields the outputs ``f(x_b) [B, C]``
and ``J_b = ∂f(x_b)/∂θ [B, C, P]`` chunk by chunk (``C`` = output entries per example,
flattened), with ``torch.func.vmap(jacrev)``. The model is evaluated in eval mode and
never modified.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.func import jacrev, vmap

from headwater.data import DataLike, iter_batches, num_examples
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import bind, detached, evaluation_mode
from headwater.task import Task

__all__ = ["check_curvature_layout", "flat_parameters", "output_jacobians"]


def flat_parameters(model: nn.Module, task: Task) -> tuple[Tensor, ParamLayout]:
    """The analysed parameters as one detached copy ``[P]`` and their layout."""
    params = detached(task.parameters(model))
    layout = ParamLayout.of(params)
    return layout.flatten(params).clone(), layout


def check_curvature_layout(curvature_layout: ParamLayout | None, layout: ParamLayout) -> None:
    """Raise ``ValueError`` naming ``curvature`` if it was fitted on other parameters."""
    if curvature_layout != layout:
        got = None if curvature_layout is None else list(curvature_layout.names)
        raise ValueError(
            f"curvature: fitted on parameters {got}, but model/task select {list(layout.names)} "
            f"with shapes {[list(s) for s in layout.shapes]}; fit it on this model and task"
        )


def _input_chunks(data: Tensor | DataLike, chunk_size: int, name: str) -> Iterator[Tensor]:
    if isinstance(data, Tensor):
        if data.dim() == 0 or data.shape[0] == 0:
            raise ValueError(
                f"{name}: expected a batch of inputs [N, ...] with N >= 1, got shape "
                f"{tuple(data.shape)}"
            )
        for start in range(0, data.shape[0], chunk_size):
            yield data[start : start + chunk_size]
        return
    num_examples(data, name)
    for inputs, _ in iter_batches(data, chunk_size, name):
        yield inputs


def output_jacobians(
    model: nn.Module,
    task: Task,
    data: Tensor | DataLike,
    *,
    chunk_size: int = 64,
    name: str = "inputs",
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(outputs [B, C], jacobians [B, C, P])`` per chunk of ``data``.

    Args:
        model: the model (left unchanged; evaluated in eval mode).
        task: gives the output (``task.output``) and the analysed parameters.
        data: a tensor of inputs ``[N, ...]`` or an ``(inputs, targets)`` pair, a
            Dataset or a DataLoader (targets are ignored).
        chunk_size: examples per ``vmap`` call; results do not depend on it.
        name: the argument name used in error messages.

    Raises:
        ValueError: naming ``name`` for empty data or inputs that do not fit the model.
    """
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
        raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
    theta, layout = flat_parameters(model, task)

    def out_single(t: Tensor, x: Tensor) -> Tensor:
        return task.output(bind(model, layout.unflatten(t)), x.unsqueeze(0)).reshape(-1)

    jac_fn = vmap(jacrev(out_single), in_dims=(None, 0))
    with evaluation_mode(model):
        for inputs in _input_chunks(data, chunk_size, name):
            x = inputs.to(theta.device)
            if x.is_floating_point():
                x = x.to(theta.dtype)
            try:
                with torch.no_grad():
                    outputs = task.output(bind(model, layout.unflatten(theta)), x)
                jac = jac_fn(theta, x)  # [B, C, P]
            except (RuntimeError, IndexError) as err:
                raise ValueError(
                    f"{name}: inputs of shape {tuple(x.shape)} do not fit the model: {err}"
                ) from err
            yield outputs.reshape(x.shape[0], -1), jac.detach()
