"""Turning the user's data into batches of ``(inputs, targets)``.

Accepted forms: an ``(inputs, targets)`` pair, a Hugging Face-style batch (a dict of
tensors whose ``"labels"`` entry holds the targets), a ``Dataset`` whose items are
``(input, target)`` pairs or such dicts, or a ``DataLoader`` yielding either.

``inputs`` may be one tensor, a tuple of tensors (passed to the model as positional
arguments) or a dict of tensors (passed as keyword arguments: ``input_ids``,
``attention_mask``, ``pixel_values``, ...); every tensor has the examples along its
first dimension. A dict batch keeps its ``"labels"`` among the inputs too (a
sequence-to-sequence task feeds them to the decoder); the tasks do not pass them to
the model otherwise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    IterableDataset,
    SequentialSampler,
    Subset,
)

from headwater.errors import InputError

__all__ = [
    "LABELS",
    "Batch",
    "DataLike",
    "Inputs",
    "as_tensors",
    "call_model",
    "check_indices",
    "describe",
    "is_sequential",
    "iter_batches",
    "map_inputs",
    "num_examples",
    "one_example",
    "split_batch",
    "subset",
    "take",
]

LABELS = "labels"
"""The key of a dict batch that holds the targets (as in Hugging Face)."""

Inputs = Tensor | tuple[Tensor, ...] | dict[str, Tensor]
Batch = tuple[Inputs, Tensor]
DataLike = tuple[Inputs, Tensor] | Mapping[str, Tensor] | Dataset | DataLoader


def map_inputs(fn: Callable[[Tensor], Tensor], inputs: Inputs) -> Inputs:
    """``fn`` applied to every tensor of ``inputs`` (same structure)."""
    return tree_map(fn, inputs)


def take(inputs: Inputs, rows: slice | Tensor) -> Inputs:
    """The examples ``rows`` of every tensor of ``inputs``."""
    return tree_map(lambda t: t[rows], inputs)


def call_model(model: Callable[..., Any], inputs: Inputs, *, labels: bool = False) -> Any:
    """``model(inputs)`` for a tensor, ``model(*inputs)`` for a tuple, ``model(**inputs)``
    for a dict (its ``"labels"`` entry left out unless ``labels``)."""
    if isinstance(inputs, Mapping):
        return model(**{k: v for k, v in inputs.items() if labels or k != LABELS})
    if isinstance(inputs, tuple | list):
        return model(*inputs)
    return model(inputs)


def one_example(inputs: Inputs) -> Inputs:
    """One example's inputs (inside ``vmap``) as a batch of one."""
    return map_inputs(lambda t: t.unsqueeze(0), inputs)


def describe(inputs: Inputs) -> str:
    """The shapes of ``inputs`` for error messages."""
    if isinstance(inputs, Tensor):
        return f"shape {tuple(inputs.shape)}"
    if isinstance(inputs, Mapping):
        return "{" + ", ".join(f"{k}: {tuple(v.shape)}" for k, v in inputs.items()) + "}"
    return "(" + ", ".join(str(tuple(t.shape)) for t in inputs) + ")"


def _canonical(inputs: Any, name: str) -> Inputs:
    """Inputs as a tensor, a tuple or a plain dict of tensors (numbers and lists converted)."""
    if isinstance(inputs, Tensor):
        return inputs
    if isinstance(inputs, Mapping):
        return {str(k): _leaf(v, f"{name}[{k!r}]") for k, v in inputs.items()}
    if isinstance(inputs, tuple | list) and inputs:
        return tuple(_leaf(v, f"{name}[{i}]") for i, v in enumerate(inputs))
    return _leaf(inputs, name)


def _leaf(value: Any, name: str) -> Tensor:
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"{name}: expected a tensor (or a tuple/dict of tensors), got {type(value).__name__}"
        ) from err


def _length(inputs: Inputs, name: str) -> int:
    leaves, _ = tree_flatten(inputs)
    if not leaves or any(t.dim() == 0 for t in leaves):
        raise ValueError(
            f"{name}: every input tensor needs the examples along dimension 0, got {describe(inputs)}"
        )
    sizes = {t.shape[0] for t in leaves}
    if len(sizes) != 1:
        raise ValueError(f"{name}: the input tensors differ in length: {describe(inputs)}")
    return sizes.pop()


def split_batch(batch: Any, name: str = "batch") -> tuple[Any, Any]:
    """A batch as ``(inputs, targets)``: an ``(inputs, targets)`` pair as given, or a dict batch
    (Hugging Face style) whose ``"labels"`` are the targets and stay among its inputs.

    The one place a batch is split: the data readers and every loss entry point of a
    :class:`~headwater.task.Task` (``train_loss``, ``measurement``) go through it, so a loop
    calling ``task.train_loss(model, batch)`` takes the batches ``headwater.influence`` does.
    Values are not converted (tensors under ``vmap`` stay as they are).

    Raises:
        TypeError: naming ``name`` for any other form, or a dict without ``"labels"``.
    """
    if isinstance(batch, Mapping):
        if LABELS not in batch:
            raise TypeError(
                f"{name}: a dict batch needs a {LABELS!r} entry (the targets), got keys "
                f"{sorted(batch)}; or give an (inputs, targets) pair"
            )
        return batch, batch[LABELS]
    if not isinstance(batch, tuple | list) or len(batch) != 2:
        raise TypeError(
            f"{name}: expected (inputs, targets) or a dict with {LABELS!r}, got "
            f"{type(batch).__name__}"
            + (f" of {len(batch)}" if isinstance(batch, tuple | list) else "")
        )
    return batch[0], batch[1]


def _split(item: Any, name: str) -> Batch:
    """One batch (or one example) as ``(inputs, targets)`` of tensors."""
    inputs, targets = split_batch(item, name)
    if isinstance(item, Mapping):
        inputs = _canonical(inputs, name)
        return inputs, inputs[LABELS]
    return _canonical(inputs, name), _leaf(targets, f"{name} targets")


def _check_pair(data: Any, name: str) -> Batch:
    if isinstance(data, tuple | list) and len(data) != 2:
        raise TypeError(f"{name}: expected an (inputs, targets) pair, got a tuple of {len(data)}")
    if isinstance(data, tuple | list) and not isinstance(data[1], Tensor):
        raise TypeError(
            f"{name}: expected (inputs, targets) tensors, got "
            f"({type(data[0]).__name__}, {type(data[1]).__name__})"
        )
    inputs, targets = _split(data, name)
    n = _length(inputs, name)
    if targets.dim() == 0 or n != targets.shape[0]:
        raise ValueError(
            f"{name}: inputs and targets differ in length ({n} vs "
            f"{targets.shape[0] if targets.dim() else 'a scalar'})"
        )
    if n == 0:
        raise ValueError(f"{name}: is empty (0 examples)")
    return inputs, targets


def _is_pair(data: Any) -> bool:
    return isinstance(data, tuple | list | Mapping)


def is_sequential(loader: DataLoader) -> bool:
    """Whether ``loader`` reads its dataset in order (so row ``i`` is example ``i``)."""
    if isinstance(loader.dataset, IterableDataset):
        return True
    batches = loader.batch_sampler
    if batches is None:
        return isinstance(loader.sampler, SequentialSampler)
    return type(batches) is BatchSampler and isinstance(batches.sampler, SequentialSampler)


def _check_loader(loader: DataLoader, n: int, name: str) -> None:
    """Refuse a loader that does not yield every one of the ``n`` examples of its dataset in
    batches: ``batch_size=None`` over a map-style dataset (single examples, not batches) or
    ``drop_last=True`` dropping the last incomplete batch (scores are indexed by position)."""
    if loader.batch_size is None and loader.batch_sampler is None:
        if not isinstance(loader.dataset, IterableDataset):  # whose items may be batches
            raise InputError(
                f"{name}: the DataLoader has batch_size=None, so it yields single examples, not "
                "batches of (inputs, targets); give it a batch_size, or pass the Dataset itself"
            )
        return
    batches = loader.batch_sampler
    drop_last = loader.drop_last or bool(getattr(batches, "drop_last", False))
    size = loader.batch_size or getattr(batches, "batch_size", None)
    if drop_last and isinstance(size, int) and n % size:
        raise InputError(
            f"{name}: the DataLoader has drop_last=True and never yields the last {n % size} of "
            f"the dataset's {n} examples; scores are indexed by position in the dataset, so "
            "pass drop_last=False, or the Dataset itself"
        )


def num_examples(data: DataLike, name: str = "data") -> int:
    """Number of examples in ``data``; raises ``ValueError`` if it is empty."""
    if _is_pair(data):
        return _check_pair(data, name)[1].shape[0]
    loader = data if isinstance(data, DataLoader) else None
    if loader is not None:
        data = loader.dataset
    if isinstance(data, Dataset):
        try:
            n = len(data)  # type: ignore[arg-type]
        except TypeError as err:
            raise TypeError(f"{name}: a Dataset without __len__ is not supported") from err
        if n == 0:
            raise ValueError(f"{name}: is empty (0 examples)")
        if loader is not None:
            _check_loader(loader, n, name)
        return n
    raise TypeError(
        f"{name}: expected an (inputs, targets) pair of tensors, a dict batch with {LABELS!r}, a Dataset "
        f"or a DataLoader, got {type(data).__name__}"
    )


def _cat(parts: Sequence[Batch], name: str) -> Batch:
    inputs = [p[0] for p in parts]
    try:
        joined = tree_map(lambda *ts: torch.cat(ts), inputs[0], *inputs[1:])
        return joined, torch.cat([p[1] for p in parts])
    except (RuntimeError, ValueError) as err:
        raise ValueError(
            f"{name}: batches of different shapes cannot be joined ({err}); pad every "
            "sequence to one length (e.g. padding='max_length')"
        ) from err


def iter_batches(data: DataLike, batch_size: int, name: str = "data") -> Iterator[Batch]:
    """Yield ``(inputs, targets)`` batches of at most ``batch_size`` examples, in order.

    A ``DataLoader`` is re-batched to ``batch_size`` so results never depend on the
    loader's own batch size. Scores are indexed by position, so a loader that does not
    read its dataset in order (``shuffle=True``, a random sampler) is refused.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size}")
    n = num_examples(data, name)
    if _is_pair(data):
        inputs, targets = _check_pair(data, name)
        for start in range(0, n, batch_size):
            rows = slice(start, start + batch_size)
            yield take(inputs, rows), targets[rows]
        return
    if isinstance(data, DataLoader) and not is_sequential(data):
        raise ValueError(
            f"{name}: the DataLoader does not read its dataset in order ({type(data.sampler).__name__}); "
            "scores are indexed by position in the data, so pass a loader with shuffle=False and no "
            "sampler, or the Dataset itself"
        )
    source = data if isinstance(data, DataLoader) else DataLoader(data, batch_size=batch_size)
    buffer: list[Batch] = []
    count = 0
    for item in source:
        inputs, targets = _split(item, name)
        buffer.append((inputs, targets))
        count += targets.shape[0]
        while count >= batch_size:
            inputs, targets = _cat(buffer, name) if len(buffer) > 1 else buffer[0]
            yield take(inputs, slice(0, batch_size)), targets[:batch_size]
            buffer = [(take(inputs, slice(batch_size, None)), targets[batch_size:])]
            count -= batch_size
    if count > 0:
        yield _cat(buffer, name) if len(buffer) > 1 else buffer[0]


def as_tensors(data: DataLike, name: str = "data") -> Batch:
    """All of ``data`` as one ``(inputs, targets)`` pair (for small data sets)."""
    if _is_pair(data):
        return _check_pair(data, name)
    return _cat(list(iter_batches(data, 4096, name)), name)


def check_indices(indices: Sequence[int] | Tensor, n: int, name: str = "indices") -> Tensor:
    """Training indices as a flat ``long`` tensor ``[k]``.

    Raises:
        ValueError: naming ``name`` if there are none or one lies outside ``[0, n)``.
    """
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if idx.numel() == 0:
        raise ValueError(f"{name}: no examples to remove")
    if int(idx.min()) < 0 or int(idx.max()) >= n:
        raise ValueError(
            f"{name}: must lie in [0, {n}), got range [{int(idx.min())}, {int(idx.max())}]"
        )
    return idx


def subset(data: DataLike, indices: Tensor | Sequence[int]) -> DataLike:
    """The examples ``indices`` of ``data`` (same form: an (inputs, targets) pair, a dict
    batch or a Dataset), in that order."""
    idx = torch.as_tensor(indices, dtype=torch.long)
    if isinstance(data, Mapping):
        return tree_map(lambda t: t[idx.to(t.device)], dict(data))
    if isinstance(data, tuple | list):
        inputs, targets = data
        return tree_map(lambda t: t[idx.to(t.device)], inputs), targets[idx.to(targets.device)]
    if isinstance(data, DataLoader):
        data = data.dataset
    if isinstance(data, Dataset):
        return Subset(data, idx.tolist())
    raise TypeError(
        f"data: expected an (inputs, targets) pair, a Dataset or a DataLoader, got {type(data).__name__}"
    )
