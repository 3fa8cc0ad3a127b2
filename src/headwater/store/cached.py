"""Load-or-compute over the store: the one rule every resumable step follows.

:func:`cached` returns what is stored at ``path`` when it was written with the same
key (the settings and :func:`fingerprint` of the inputs it depends on), else computes,
saves and returns it. Under ``torch.distributed`` the ranks decide together: every
rank loads when every rank sees the store, else every rank computes (the computation
may be collective); a shared store is written by rank 0 alone (a per-rank one by
each rank) and every rank waits until it is complete. Writing is atomic
(:func:`headwater.store.save`); a store of other settings raises
:class:`~headwater.store.StoreMismatchError` naming them, on every rank.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from torch import Tensor

from headwater import store
from headwater.distributed import all_ranks, barrier, world

log = logging.getLogger("headwater.store")

__all__ = ["cached", "cached_tensors", "fingerprint"]

T = TypeVar("T")


def fingerprint(*tensors: Tensor) -> str:
    """A short SHA-256 of the tensors' dtypes, shapes and bytes (store keys)."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:20]


def cached(
    path: str | os.PathLike | None,
    load: Callable[[], T],
    compute: Callable[[], T],
    save: Callable[[T], None],
    *,
    per_rank: bool = False,
    read_only: bool = False,
    note: Callable[[str], None] | None = None,
) -> T:
    """``load()`` when the store at ``path`` exists on every rank, else ``compute()`` then
    ``save(value)`` (on rank 0 only unless ``per_rank``: a file per rank) and a barrier.
    ``path=None``: just ``compute()``. ``load`` raises ``StoreMismatchError`` for a store of
    other settings (then on every rank, see :func:`~headwater.store.on_every_rank`).

    A damaged store (``StoreDamagedError``: size, checksum or header) is recomputed after one
    warning line; with ``read_only`` it raises instead, and so does a missing store
    (``StoreError``). ``note``, if given, hears one line saying what was done."""
    if path is None:
        return compute()
    tell = note or (lambda _: None)
    what = f"computed and saved to {path}"
    if all_ranks(store.exists(path)):
        try:
            value = store.on_every_rank(load, path)
        except store.StoreDamagedError as err:
            if read_only:
                raise
            log.warning("%s; recomputing it", err)
            what = f"recomputed: {err}"
        else:
            log.info("reusing the stored %s", path)
            tell(f"loaded from {path} (checksum verified)")
            return value
    elif read_only:
        raise store.StoreError(f"store: no complete store at {path} to read (read_only=True)")
    value = compute()
    if per_rank or world()[0] == 0:
        save(value)
    barrier()  # the store is complete before any rank goes on (and may look for it)
    tell(what)
    return value


def cached_tensors(
    path: str | os.PathLike | None,
    key: dict[str, Any],
    compute: Callable[[], dict[str, Tensor]],
    *,
    device: str | torch.device = "cpu",
    per_rank: bool = False,
) -> dict[str, Tensor]:
    """:func:`cached` for a tensor dict stored with ``key`` as its settings."""
    return cached(
        path,
        lambda: store.load(path, expect=key, device=device)[0],
        compute,
        lambda tensors: store.save(path, tensors, key),
        per_rank=per_rank,
    )
