"""Functional views of the user's model: bind a parameter dict, leave the model alone."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from torch import Tensor, nn
from torch.func import functional_call

__all__ = ["bind", "detached", "evaluation_mode", "first_param", "prepare_batch"]


def bind(model: nn.Module, params: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """``inputs -> model(inputs)`` with ``params`` substituted for the named parameters.

    Other parameters take the model's own values, detached (so nothing computed through
    ``bind`` keeps an autograd graph back to parameters that are not analysed), and buffers
    are the model's own. Nothing is written to the model.
    """
    own = dict(model.named_parameters(remove_duplicate=False))
    chosen = {id(own[k]) for k in params if k in own}  # a tied alias follows its substitute
    detached: dict[int, Tensor] = {}  # tied names of a parameter share one detached tensor
    full = {k: detached.setdefault(id(p), p.detach()) for k, p in own.items()
            if k not in params and id(p) not in chosen}
    full.update(params)

    def call(inputs: Tensor) -> Tensor:
        return functional_call(model, full, (inputs,), strict=False)

    return call


@contextlib.contextmanager
def evaluation_mode(model: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def prepare_batch(
    batch: tuple[Tensor, Tensor], like: Tensor
) -> tuple[Tensor, Tensor]:
    """Move a batch to the parameters' device; floating inputs take their dtype."""
    inputs, targets = batch
    inputs = inputs.to(like.device)
    if inputs.is_floating_point():
        inputs = inputs.to(like.dtype)
    targets = targets.to(like.device)
    if targets.is_floating_point():
        targets = targets.to(like.dtype)
    return inputs, targets


def detached(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Plain tensors sharing the parameters' storage, with no autograd history."""
    return {k: p.detach() for k, p in params.items()}


def first_param(params: dict[str, Tensor]) -> Tensor:
    return next(iter(params.values()))


