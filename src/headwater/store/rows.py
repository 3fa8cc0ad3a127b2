"""A large ``[rows, cols]`` array on disk, filled chunk by chunk and resumable.

``path.npy`` is a NumPy memmap; ``path.json`` records the settings that produce the
rows, how many rows are written and a checksum (BLAKE2b) of every appended chunk. Rows
are flushed to disk *before* the sidecar counts them (the sidecar is replaced
atomically), so after a crash a rerun with the same settings resumes after the last
counted row, and a store is reported complete only when every row is in. A store
written with other settings is refused.

On opening, the file's header, size and every counted chunk's checksum are verified:
damage (a truncated or oversized file, an unreadable header, flipped bytes, an
impossible row count) is logged as one warning line naming the file, and the rows
from the first damaged chunk on are recomputed (``read_only=True``: a
:class:`~headwater.errors.StoreError` instead). :attr:`RowStore.status` says in one
line what was found.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from headwater.errors import StoreError
from headwater.store import atomic_write_bytes, mismatch, write_error
from headwater.version import __version__

__all__ = ["RowStore"]

log = logging.getLogger("headwater.store")

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


def _digest(rows: np.ndarray) -> str:
    return hashlib.blake2b(np.ascontiguousarray(rows).data, digest_size=16).hexdigest()


class RowStore:
    """Open (create or resume) the row store at ``path``.

    Args:
        path: base path; ``.npy`` and ``.json`` are appended.
        shape: ``(rows, cols)`` of the full array.
        dtype: ``torch.float32``, ``torch.float64`` or ``torch.float16``.
        meta: the settings that produce the rows (JSON-serialisable); an existing
            store with other settings, shape or dtype raises ``StoreMismatchError``.
        read_only: raise :class:`~headwater.errors.StoreError` for a damaged store
            instead of recomputing its damaged rows.

    Attributes:
        rows_done: rows stored and verified (appending continues after them).
        status: one line: created, resumed from which row, or what was damaged.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        shape: tuple[int, int],
        dtype: torch.dtype,
        meta: dict[str, Any],
        *,
        read_only: bool = False,
    ):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {list(_DTYPES)}, got {dtype}")
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"shape: expected (rows, cols) with both > 0, got {shape}")
        base = Path(path)
        self.array_path = base.with_name(base.name + ".npy")
        self.meta_path = base.with_name(base.name + ".json")
        self.shape, self.dtype, self.read_only = (int(shape[0]), int(shape[1])), dtype, read_only
        self.meta = json.loads(json.dumps(meta, sort_keys=True, default=str))
        self.rows_done, self._chunks = 0, []  # [[stop row, digest], ...] of the appended chunks
        self._damage: str | None = None
        self.status = f"{self.array_path.name}: new store of {self.shape[0]} rows"
        self._array = (
            self._resume() if self.meta_path.is_file() and self.array_path.is_file() else None
        )
        if self._array is None:
            self._create()

    def _record(self) -> dict[str, Any]:
        return {
            "headwater_version": __version__,
            "meta": self.meta,
            "shape": list(self.shape),
            "dtype": str(self.dtype),
            "rows_done": self.rows_done,
            "chunks": self._chunks,
        }

    def _write_sidecar(self) -> None:
        try:
            atomic_write_bytes(self.meta_path, json.dumps(self._record(), sort_keys=True).encode())
        except OSError as err:
            raise write_error(self.meta_path, err) from err

    def _create(self) -> None:
        self.rows_done, self._chunks = 0, []
        try:
            self.array_path.parent.mkdir(parents=True, exist_ok=True)
            self.array_path.unlink(missing_ok=True)
            np.lib.format.open_memmap(
                self.array_path, mode="w+", dtype=_DTYPES[self.dtype], shape=self.shape
            ).flush()
        except OSError as err:
            raise write_error(self.array_path, err) from err
        self._write_sidecar()
        self._array = np.load(self.array_path, mmap_mode="r+")

    def _damaged(self, what: str) -> None:
        if self.read_only:
            raise StoreError(
                f"store: {self.array_path} is damaged ({what}); delete it to recompute"
            )
        log.warning("store: %s is damaged (%s); recomputing it", self.array_path, what)
        self._damage = what
        self.status = f"{self.array_path.name}: damaged ({what}), recomputed"

    def _resume(self) -> np.memmap | None:
        """Verify the stored rows; the memmap to append to, or ``None`` to start afresh."""
        try:
            record = json.loads(self.meta_path.read_text())
            stored = {
                **(record.get("meta") or {}),
                "shape": record.get("shape"),
                "dtype": record.get("dtype"),
            }
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
            self._damaged(f"unreadable sidecar {self.meta_path.name}: {err}")
            return None
        error = mismatch(
            self.array_path,
            stored,
            {**self.meta, "shape": list(self.shape), "dtype": str(self.dtype)},
        )
        if error is not None:
            raise error
        try:  # read-only first: "r+" would silently extend a truncated file with zeros
            array = np.load(self.array_path, mmap_mode="r")
        except (
            ValueError,
            OSError,
            EOFError,
        ) as err:  # an unreadable header, a file shorter than it says
            self._damaged(f"unreadable array: {' '.join(str(err).split())}")
            return None
        size, expected = self.array_path.stat().st_size, array.offset + array.nbytes
        if array.shape != self.shape or array.dtype != _DTYPES[self.dtype] or size != expected:
            self._damaged(f"{size} bytes for a {array.shape} {array.dtype} array of {expected}")
            return None
        self.rows_done = self._verified_rows(record, array)
        del array
        if self.rows_done:
            self.status = (
                f"{self.array_path.name}: {'reused all' if self.complete else 'resumed after'} "
                f"{self.rows_done} of {self.shape[0]} stored rows (checksums verified)"
                + (f"; damaged after that ({self._damage}): recomputed" if self._damage else "")
            )
        return np.load(self.array_path, mmap_mode="r+")

    def _verified_rows(self, record: dict[str, Any], array: np.ndarray) -> int:
        """Rows up to the first chunk whose checksum (or row count) is wrong."""
        chunks, rows_done = record.get("chunks"), record.get("rows_done")
        if chunks is None:
            self._damaged("no checksums recorded (an older version's store)")
            return 0
        try:
            ends = [int(stop) for stop, _ in chunks]
        except (TypeError, ValueError):
            ends = [-1]
        if (
            not isinstance(rows_done, int)
            or (ends[-1] if ends else 0) != rows_done
            or not 0 <= rows_done <= self.shape[0]
        ):
            self._damaged(f"impossible row count {rows_done!r}")
            return 0
        start = 0
        for i, (stop, digest) in enumerate(chunks):
            if not start < stop <= rows_done or _digest(array[start:stop]) != digest:
                self._damaged(f"rows {start}-{stop} fail their checksum")
                self._chunks = chunks[:i]
                return start
            start = stop
        self._chunks = chunks
        return rows_done

    @property
    def complete(self) -> bool:
        return self.rows_done == self.shape[0]

    def append(self, rows: Tensor) -> None:
        """Write ``rows [B, cols]`` after the rows already stored, flush, then count them."""
        if rows.dim() != 2 or rows.shape[1] != self.shape[1]:
            raise ValueError(f"rows: expected [B, {self.shape[1]}], got {tuple(rows.shape)}")
        stop = self.rows_done + rows.shape[0]
        if stop > self.shape[0]:
            raise ValueError(f"rows: {stop} rows would exceed the store's {self.shape[0]}")
        data = rows.detach().cpu().to(self.dtype).numpy()
        try:
            self._array[self.rows_done : stop] = data
            self._array.flush()
        except OSError as err:
            raise write_error(self.array_path, err) from err
        self.rows_done = stop
        self._chunks.append([stop, _digest(data)])
        self._write_sidecar()

    def chunks(self, size: int) -> Iterator[Tensor]:
        """The stored rows in order, ``size`` at a time (copies, safe to keep)."""
        if not self.complete:
            raise RuntimeError(
                f"store: {self.array_path} holds {self.rows_done} of {self.shape[0]} rows"
            )
        for start in range(0, self.shape[0], size):
            yield torch.from_numpy(np.array(self._array[start : start + size]))

    def read(self) -> Tensor:
        """All rows as one tensor (small stores)."""
        return torch.cat(list(self.chunks(self.shape[0])))
