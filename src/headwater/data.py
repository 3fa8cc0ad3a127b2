"""Turning the user's data into batches of ``(inputs, targets)`` tensors.

Accepted forms: an ``(inputs, targets)`` pair of tensors, a ``Dataset`` whose items
are ``(input, target)`` pairs, or a ``DataLoader`` yielding such pairs.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Subset

__all__ = ["Batch", "DataLike", "as_tensors", "check_indices", "iter_batches", "num_examples"]

Batch = tuple[Tensor, Tensor]
DataLike = tuple[Tensor, Tensor] | Dataset | DataLoader


@dataclass(frozen=True)
class _Pair:
    inputs: Tensor
    targets: Tensor


def _check_pair(data: tuple, name: str) -> _Pair:
    if len(data) != 2:
        raise TypeError(f"{name}: expected an (inputs, targets) pair, got a tuple of {len(data)}")
    inputs, targets = data
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise TypeError(
            f"{name}: expected (inputs, targets) tensors, got "
            f"({type(inputs).__name__}, {type(targets).__name__})"
        )
    if inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"{name}: inputs and targets differ in length ({inputs.shape[0]} vs {targets.shape[0]})"
        )
    if inputs.shape[0] == 0:
        raise ValueError(f"{name}: is empty (0 examples)")
    return _Pair(inputs, targets)


def num_examples(data: DataLike, name: str = "data") -> int:
    """Number of examples in ``data``; raises ``ValueError`` if it is empty."""
    if isinstance(data, tuple | list):
        return _check_pair(tuple(data), name).inputs.shape[0]
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, Dataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError as err:
            raise TypeError(f"{name}: a Dataset without __len__ is not supported") from err
        if n == 0:
            raise ValueError(f"{name}: is empty (0 examples)")
        return n
    raise TypeError(
        f"{name}: expected an (inputs, targets) pair of tensors, a Dataset or a DataLoader, "
        f"got {type(data).__name__}"
    )


def iter_batches(data: DataLike, batch_size: int, name: str = "data") -> Iterator[Batch]:
    """Yield ``(inputs, targets)`` batches of at most ``batch_size`` examples, in order.

    A ``DataLoader`` is re-batched to ``batch_size`` so results never depend on the
    loader's own batch size; its order is kept (do not shuffle data you attribute to).
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size}")
    n = num_examples(data, name)
    if isinstance(data, tuple | list):
        pair = _check_pair(tuple(data), name)
        for start in range(0, n, batch_size):
            yield pair.inputs[start : start + batch_size], pair.targets[start : start + batch_size]
        return
    source = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    buf_x: list[Tensor] = []
    buf_y: list[Tensor] = []
    count = 0
    for item in source:
        if not isinstance(item, tuple | list) or len(item) != 2:
            raise TypeError(f"{name}: each item must be an (input, target) pair")
        x, y = (torch.as_tensor(t) for t in item)
        buf_x.append(x)
        buf_y.append(y)
        count += x.shape[0]
        while count >= batch_size:
            xs, ys = torch.cat(buf_x), torch.cat(buf_y)
            yield xs[:batch_size], ys[:batch_size]
            buf_x, buf_y = [xs[batch_size:]], [ys[batch_size:]]
            count -= batch_size
    if count > 0:
        yield torch.cat(buf_x), torch.cat(buf_y)


def as_tensors(data: DataLike, name: str = "data") -> Batch:
    """All of ``data`` as one ``(inputs, targets)`` pair (for small data sets)."""
    if isinstance(data, tuple | list):
        pair = _check_pair(tuple(data), name)
        return pair.inputs, pair.targets
    xs, ys = zip(*iter_batches(data, 4096, name), strict=True)
    return torch.cat(xs), torch.cat(ys)


def check_indices(indices: Sequence[int] | Tensor, n: int, name: str = "indices") -> Tensor:
    """Training indices as a flat ``long`` tensor ``[k]``.

    Raises:
        ValueError: naming ``name`` if there are none or one lies outside ``[0, n)``.
    """
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if idx.numel() == 0:
        raise ValueError(f"{name}: no examples to remove")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(f"{name}: must lie in [0, {n}), got range [{int(idx.min())}, {int(idx.max())}]")
    return idx


def subset(data: DataLike, indices: Tensor | Sequence[int]) -> DataLike:
    """The examples ``indices`` of ``data`` (same form: tensor pair or Dataset), in that order."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(data, tuple | list):
        inputs, targets = data
        return inputs[idx.to(inputs.device)], targets[idx.to(targets.device)]
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, Dataset):
        return Subset(data, idx.tolist())
    raise TypeError(
        f"data: expected an (inputs, targets) pair, a Dataset or a DataLoader, got {type(data).__name__}"
    )
