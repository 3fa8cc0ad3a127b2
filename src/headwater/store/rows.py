"""A large ``[rows, cols]`` array on disk, filled chunk by chunk and resumable.

``path.npy`` is a NumPy memmap; ``path.json`` records the settings that produce the
rows and how many rows are written. Rows are flushed to disk *before* the sidecar
counts them (the sidecar is replaced atomically), so after a crash a rerun with
the same settings resumes after the last counted row, and a store is reported
complete only when every row is in. A store written with other settings is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from headwater.store import atomic_write_bytes, mismatch
from headwater.version import __version__

__all__ = ["RowStore"]

_DTYPES = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16}


class RowStore:
    """Open (create or resume) the row store at ``path``.

    Args:
        path: base path; ``.npy`` and ``.json`` are appended.
        shape: ``(rows, cols)`` of the full array.
        dtype: ``torch.float32``, ``torch.float64`` or ``torch.float16``.
        meta: the settings that produce the rows (JSON-serialisable); an existing
            store with other settings, shape or dtype raises ``StoreMismatchError``.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, int], dtype: torch.dtype, meta: dict[str, Any]):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype: expected one of {list(_DTYPES)}, got {dtype}")
        if len(shape) != 2 or min(shape) <= 0:
            raise ValueError(f"shape: expected (rows, cols) with both > 0, got {shape}")
        base = Path(path)
        self.array_path = base.with_name(base.name + ".npy")
        self.meta_path = base.with_name(base.name + ".json")
        self.shape, self.dtype = (int(shape[0]), int(shape[1])), dtype
        self.meta = json.loads(json.dumps(meta, sort_keys=True, default=str))
        self.rows_done = 0
        if self.meta_path.is_file() and self.array_path.is_file():
            self._resume()
        else:
            self.array_path.parent.mkdir(parents=True, exist_ok=True)
            np.lib.format.open_memmap(self.array_path, mode="w+", dtype=_DTYPES[dtype], shape=self.shape).flush()
            self._write_sidecar()
        self._array = np.load(self.array_path, mmap_mode="r+")

    def _record(self) -> dict[str, Any]:
        return {"headwater_version": __version__, "meta": self.meta, "shape": list(self.shape),
                "dtype": str(self.dtype), "rows_done": self.rows_done}

    def _write_sidecar(self) -> None:
        atomic_write_bytes(self.meta_path, json.dumps(self._record(), indent=2, sort_keys=True).encode())

    def _resume(self) -> None:
        try:
            record = json.loads(self.meta_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"store: unreadable metadata at {self.meta_path}: {err}") from err
        wanted = {**self.meta, "shape": list(self.shape), "dtype": str(self.dtype)}
        error = mismatch(self.array_path, {**(record.get("meta") or {}), "shape": record.get("shape"),
                                           "dtype": record.get("dtype")}, wanted)
        if error is not None:
            raise error
        self.rows_done = int(record["rows_done"])

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
        self._array[self.rows_done : stop] = rows.detach().cpu().to(self.dtype).numpy()
        self._array.flush()
        self.rows_done = stop
        self._write_sidecar()

    def chunks(self, size: int) -> Iterator[Tensor]:
        """The stored rows in order, ``size`` at a time (copies, safe to keep)."""
        if not self.complete:
            raise RuntimeError(f"store: {self.array_path} holds {self.rows_done} of {self.shape[0]} rows")
        for start in range(0, self.shape[0], size):
            yield torch.from_numpy(np.array(self._array[start : start + size]))

    def read(self) -> Tensor:
        """All rows as one tensor (small stores)."""
        return torch.cat(list(self.chunks(self.shape[0])))
