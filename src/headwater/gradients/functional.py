"""Functional views of the user's model: bind a parameter dict, leave the model alone."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Collection, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from headwater.data import Inputs, map_inputs

__all__ = [
    "OutputBytes",
    "bind",
    "check_device",
    "detached",
    "evaluation_mode",
    "first_param",
    "prepare_batch",
    "vmap_examples",
]


_DATA_DEPENDENT = "data-dependent control flow"


def vmap_examples(fn: Callable[..., Any], in_dims: tuple[int | None, ...]) -> Callable[..., Any]:
    """``vmap(fn, in_dims)`` over the examples, or a loop over them when the model branches on
    its inputs' values (e.g. a Hugging Face attention mask checked with ``.all()``), which
    ``vmap`` cannot trace. Same numbers either way; the loop is slower."""
    mapped = vmap(fn, in_dims=in_dims)

    def looped(*args: Any) -> Any:
        batched = [a for a, d in zip(args, in_dims) if d is not None]
        n = tree_flatten(batched[0])[0][0].shape[0]
        rows = [
            fn(
                *(
                    a if d is None else tree_map(lambda t, i=i: t[i], a)
                    for a, d in zip(args, in_dims)
                )
            )
            for i in range(n)
        ]
        return tree_map(lambda *ts: torch.stack(ts), rows[0], *rows[1:])

    def call(*args: Any) -> Any:
        with sdpa_kernel(SDPBackend.MATH):  # the fused attention kernels have no batching rule
            try:
                return mapped(*args)
            except RuntimeError as err:
                if _DATA_DEPENDENT not in str(err):
                    raise
                return looped(*args)

    return call


def bind(model: nn.Module, params: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    """``(*args, **kwargs) -> model(*args, **kwargs)`` with ``params`` substituted for the named parameters.

    Other parameters take the model's own values, detached (so nothing computed through
    ``bind`` keeps an autograd graph back to parameters that are not analysed), and buffers
    are the model's own. Nothing is written to the model.
    """
    own = dict(model.named_parameters(remove_duplicate=False))
    chosen = {id(own[k]) for k in params if k in own}  # a tied alias follows its substitute
    detached: dict[int, Tensor] = {}  # tied names of a parameter share one detached tensor
    full = {
        k: detached.setdefault(id(p), p.detach())
        for k, p in own.items()
        if k not in params and id(p) not in chosen
    }
    full.update(params)

    def call(*args: Any, **kwargs: Any) -> Any:
        return functional_call(model, full, args, kwargs, strict=False)

    return call


@contextlib.contextmanager
def evaluation_mode(model: nn.Module, train: Collection[str] = ()) -> Iterator[None]:
    """Put every submodule in eval mode (but those named in ``train``: train mode), then
    restore each one's own flag."""
    flags, train = [(m, m.training) for m in model.modules()], set(train)
    model.eval()
    for name, module in model.named_modules() if train else ():
        if name in train:
            module.training = True
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def _to_like(t: Tensor, like: Tensor) -> Tensor:
    t = t.to(like.device, like.dtype) if t.is_floating_point() else t.to(like.device)
    return t.contiguous()  # some models .view() their inputs


def prepare_batch(batch: tuple[Inputs, Tensor], like: Tensor) -> tuple[Inputs, Tensor]:
    """Move a batch (every tensor of its inputs) to the parameters' device; floating
    tensors take their dtype."""
    inputs, targets = batch
    return map_inputs(lambda t: _to_like(t, like), inputs), _to_like(targets, like)


def check_device(device: str | torch.device, name: str = "device") -> torch.device:
    """``device`` as a ``torch.device`` once tensors can be made there.

    Raises:
        ValueError: naming ``name`` (one line) for a malformed device or one this torch
            build or machine does not have (``"cuda"`` on a CPU-only torch, ``"mps"`` off a Mac).
    """
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError) as err:
        raise ValueError(
            f"{name}: {device!r} is not a torch device ({str(err).splitlines()[0]})"
        ) from err
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}.get(
        parsed.type
    )
    if available is not None and not available():
        raise ValueError(
            f"{name}: {str(device)!r} is not available (torch {torch.__version__} on this machine "
            f"has no usable {parsed.type} device); use 'cpu'"
        )
    try:
        torch.empty(0, device=parsed)
    except (RuntimeError, ValueError, AssertionError) as err:
        raise ValueError(
            f"{name}: cannot use device {str(device)!r} ({str(err).splitlines()[0]})"
        ) from err
    return parsed


def detached(params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
    """Plain tensors sharing the parameters' storage, with no autograd history."""
    return {k: p.detach() for k, p in params.items()}


def first_param(params: dict[str, Tensor]) -> Tensor:
    return next(iter(params.values()))


class OutputBytes(TorchFunctionMode):
    """Counts the bytes of every tensor the code run under it creates (``.total``)."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in result if isinstance(result, tuple | list) else (result,):
            if isinstance(t, Tensor):
                self.total += t.numel() * t.element_size()
        return result
