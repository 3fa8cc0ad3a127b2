"""Several processes under ``torch.distributed``: shard, add across ranks, gather.

Every rank passes the same (whole) training data. Sums over training examples are
computed on this rank's :func:`shard` — the contiguous examples
``[r·n//W, (r+1)·n//W)`` of rank ``r`` among ``W`` — added across ranks with
:func:`all_reduce_sum_` and only then divided by the global ``n``; score columns
``[n_query, n_r]`` are concatenated in global order by :func:`gather_columns`. So
every rank ends with the numbers one process would compute (up to the order of
floating-point additions).

This turns on only when a process group is initialised (by ``torchrun`` plus
``torch.distributed.init_process_group``, or by the user) with more than one
process. Otherwise :func:`world` is ``(0, 1)``, :func:`shard` returns its argument
and the collectives do nothing: a single process runs the same code and gets the
same numbers as without this module. Under a process group, every function that
streams over training data is *collective*: all ranks must call it in the same
order with the same arguments. :func:`single_process` switches this off inside a
block (e.g. to score on rank 0 only after distributed training).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from contextvars import ContextVar

import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, Subset

from headwater.data import (
    Batch,
    DataLike,
    as_tensors,
    is_sequential,
    iter_batches,
    num_examples,
    take,
)

__all__ = [
    "all_ranks",
    "all_reduce_sum_",
    "barrier",
    "gather_columns",
    "local_batches",
    "shard",
    "shard_range",
    "single_process",
    "world",
]

_SINGLE = ContextVar("headwater_single_process", default=False)


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` when ``torch.distributed`` is
    unavailable, not initialised, or inside :func:`single_process`."""
    if _SINGLE.get() or not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


@contextlib.contextmanager
def single_process() -> Iterator[None]:
    """Inside this block every headwater call runs on the whole data in this process
    alone, as if no process group were initialised (no collective is called)."""
    token = _SINGLE.set(True)
    try:
        yield
    finally:
        _SINGLE.reset(token)


def shard_range(n: int) -> tuple[int, int]:
    """This rank's examples ``[start, stop)`` of ``n``: ``[r·n//W, (r+1)·n//W)``.

    Ranks hold contiguous blocks in rank order, so concatenating them gives the
    global order; sizes differ by at most one, and a rank is empty when ``n < W``.

    Raises:
        ValueError: naming ``n`` if it is not an integer >= 0.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n: must be an integer >= 0, got {n!r}")
    rank, size = world()
    return rank * n // size, (rank + 1) * n // size


def shard(data: DataLike, name: str = "data") -> DataLike:
    """This rank's part of ``data``: the examples of :func:`shard_range`, same form.

    An ``(inputs, targets)`` pair gives a pair of views; a ``Dataset`` a ``Subset``;
    a ``DataLoader`` a loader over a ``Subset`` of its dataset with the same batch
    size, collate function and workers. With one process ``data`` itself is returned.
    A rank's part may be empty (``n < W``); :func:`local_batches` then yields nothing.

    Args:
        data: an ``(inputs, targets)`` pair of tensors, a Dataset or a DataLoader.
        name: the argument name used in error messages.

    Raises:
        TypeError / ValueError: naming ``name`` for data that is not a DataLike or is
            empty (as :func:`~headwater.data.num_examples`); with several processes,
            also an ``IterableDataset`` or a DataLoader that does not read its dataset
            in order (a sampler or shuffling).
    """
    n = num_examples(data, name)
    if world()[1] == 1:
        return data
    source = data.dataset if isinstance(data, DataLoader) else data
    if isinstance(source, IterableDataset):
        raise ValueError(
            f"{name}: an IterableDataset cannot be sharded by index; pass a "
            "map-style Dataset or an (inputs, targets) pair"
        )
    start, stop = shard_range(n)
    if isinstance(data, tuple | list | Mapping):
        inputs, targets = as_tensors(data, name)
        return take(inputs, slice(start, stop)), targets[start:stop]
    part = Subset(source, range(start, stop))
    if not isinstance(data, DataLoader):
        return part
    if not is_sequential(data):
        raise ValueError(
            f"{name}: under torch.distributed a DataLoader must read its dataset "
            "in order (no sampler, no shuffle); pass it without one, or its dataset"
        )
    batch_size = None if data.batch_sampler is None else data.batch_sampler.batch_size
    return DataLoader(
        part,
        batch_size=batch_size,
        collate_fn=data.collate_fn,
        num_workers=data.num_workers,
        pin_memory=data.pin_memory,
        timeout=data.timeout,
        worker_init_fn=data.worker_init_fn,
    )


def local_batches(data: DataLike, batch_size: int, name: str = "data") -> Iterator[Batch]:
    """``(inputs, targets)`` batches of this rank's :func:`shard`, in order (none when
    the shard is empty); with one process exactly :func:`~headwater.data.iter_batches`."""
    start, stop = shard_range(num_examples(data, name))
    if stop > start:
        yield from iter_batches(shard(data, name), batch_size, name)
    elif batch_size <= 0:
        raise ValueError(f"batch_size: must be a positive integer, got {batch_size}")


def _check_tensors(tensors: Tensor | Sequence[Tensor], name: str) -> list[Tensor]:
    items = [tensors] if isinstance(tensors, Tensor) else tensors
    if not isinstance(items, Sequence) or isinstance(items, str):
        raise TypeError(
            f"{name}: expected a Tensor or a sequence of Tensors, got {type(tensors).__name__}"
        )
    for i, t in enumerate(items):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}]: expected a Tensor, got {type(t).__name__}")
    return list(items)


def all_reduce_sum_(tensors: Tensor | Sequence[Tensor]) -> None:
    """Replace each tensor, in place, by its sum over all ranks (nothing with one process).

    Every rank must pass tensors of the same shapes and dtypes in the same order.
    Sums keep running counts mergeable: divide by the global count afterwards.

    Raises:
        TypeError: naming ``tensors`` if an item is not a Tensor.
    """
    items = _check_tensors(tensors, "tensors")
    if world()[1] == 1:
        return
    for t in items:
        if t.is_contiguous():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        else:
            buffer = t.contiguous()
            dist.all_reduce(buffer, op=dist.ReduceOp.SUM)
            t.copy_(buffer)


def barrier() -> None:
    """Wait until every rank gets here (nothing with one process)."""
    if world()[1] > 1:
        dist.barrier()


def all_ranks(flag: bool) -> bool:
    """``True`` when ``flag`` is true on every rank (collective; ``flag`` itself with one
    process). Ranks decide together, e.g. to load a store only if every rank has it."""
    if world()[1] == 1:
        return bool(flag)
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    )
    count = torch.tensor([int(bool(flag))], device=device)
    dist.all_reduce(count, op=dist.ReduceOp.SUM)
    return int(count) == world()[1]


def gather_columns(t: Tensor) -> Tensor:
    """Concatenate every rank's block ``[q, n_r]`` into ``[q, Σ_r n_r]``, in rank order.

    With :func:`shard` blocks this is the global order of the training examples.
    Blocks may differ in width (uneven or empty shards): the widths are gathered
    first and each block is padded to the widest. Every rank gets the whole matrix;
    with one process ``t`` itself is returned.

    Raises:
        TypeError: naming ``t`` if it is not a Tensor.
        ValueError: naming ``t`` if it is not 2-D, or (on every rank) if the ranks'
            blocks differ in rows.
    """
    if not isinstance(t, Tensor):
        raise TypeError(f"t: expected a Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"t: expected a 2-D block [q, n_r], got shape {tuple(t.shape)}")
    size = world()[1]
    if size == 1:
        return t
    shape = torch.tensor(t.shape, dtype=torch.long, device=t.device)
    shapes = [torch.empty_like(shape) for _ in range(size)]
    dist.all_gather(shapes, shape)
    rows = [int(s[0]) for s in shapes]
    widths = [int(s[1]) for s in shapes]
    if len(set(rows)) != 1:
        raise ValueError(f"t: every rank must pass the same number of rows; got {rows} by rank")
    padded = t.new_zeros(rows[0], max(widths))
    padded[:, : t.shape[1]] = t
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:, :w] for p, w in zip(parts, widths, strict=True)], dim=1)
