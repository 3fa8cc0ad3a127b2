"""On-disk state: tensor dicts (safetensors) with a JSON sidecar, written atomically.

``save(path, tensors, meta)`` writes ``path.safetensors`` and ``path.json`` through
temporary files and renames, the sidecar last, so a half-written store is never
presented as complete. ``load(path, expect=...)`` refuses a store whose settings
differ from what the caller expects.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from headwater.distributed import all_ranks
from headwater.version import __version__

__all__ = ["StoreMismatchError", "atomic_write_bytes", "exists", "load", "mismatch", "on_every_rank", "save"]

T = TypeVar("T")


class StoreMismatchError(ValueError):
    """A store on disk was written with other settings than the ones requested.

    Attributes:
        keys: the settings that differ (``"context.model"`` for a nested one).
    """

    def __init__(self, message: str, keys: tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = keys


def mismatch(path: Any, stored: dict[str, Any], wanted: dict[str, Any]) -> StoreMismatchError | None:
    """A :class:`StoreMismatchError` naming every differing setting, or ``None``."""
    flat_s, flat_w = _flatten(stored), _flatten(wanted)  # nested settings compared key by key
    keys = sorted(k for k in set(flat_s) | set(flat_w) if flat_s.get(k) != flat_w.get(k))
    if not keys:
        return None
    detail = "; ".join(f"{k}: stored {flat_s.get(k)!r}, requested {flat_w.get(k)!r}" for k in keys[:4])
    more = f" (and {len(keys) - 4} more)" if len(keys) > 4 else ""
    return StoreMismatchError(f"store: {path} was written with other {', '.join(keys)}: {detail}{more}; "
                              "delete it or use another path", tuple(keys))


def on_every_rank(open_store: Callable[[], T], path: Any) -> T:
    """``open_store()``, failing on every rank when it fails on any.

    Under ``torch.distributed`` each rank may open its own file (``path``): when one
    rank's raises, the others raise too instead of going on into a collective step
    that rank never reaches — :class:`StoreMismatchError` on every rank when each
    failure is a mismatch (so the ranks can refit together), else the failing rank's
    own error and ``RuntimeError`` on the others (collective; with one process it is
    just ``open_store()``)."""
    error: Exception | None = None
    try:
        result = open_store()
    except Exception as err:  # any failure: the other ranks must not wait for this one
        error = err
    if all_ranks(error is None):
        return result
    if all_ranks(error is None or isinstance(error, StoreMismatchError)):
        raise error or StoreMismatchError(  # every rank refuses; e.g. the CLI refits together
            f"store: another rank's file beside {path} was written with other settings; "
            "delete the store or use another path")
    if error is not None:
        raise error
    raise RuntimeError(f"store: another rank failed to open its file beside {path} (see that rank's error)")


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (JSON-normalised leaves)."""
    value = _normalise(value)
    if not isinstance(value, dict) or not value:  # an empty dict stays a leaf ({} != None)
        return {prefix.rstrip("."): value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flatten(item, f"{prefix}{key}."))
    return out


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    base = Path(path)
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def _publish(tmp: str, target: Path) -> None:
    """Give a temporary file the usual permissions (mkstemp makes it 0600), then rename it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, target)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` via a temporary file in the same folder and a rename."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        _publish(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Save a tensor dict and its settings at ``path`` (two files, sidecar last)."""
    tensor_path, meta_path = _paths(path)
    tensor_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=tensor_path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        _publish(tmp, tensor_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    record = {"headwater_version": __version__, "meta": meta}
    atomic_write_bytes(meta_path, json.dumps(record, indent=2, sort_keys=True, default=str).encode())


def exists(path: str | os.PathLike) -> bool:
    tensor_path, meta_path = _paths(path)
    return tensor_path.is_file() and meta_path.is_file()


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def load(
    path: str | os.PathLike, *, expect: dict[str, Any] | None = None, device: str | torch.device = "cpu"
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load ``(tensors, meta)`` from ``path``.

    Args:
        expect: settings that must equal the stored ones (keys absent from the store count
            as different).

    Raises:
        FileNotFoundError: if the store is missing or incomplete.
        StoreMismatchError: if a setting in ``expect`` differs, naming it.
    """
    tensor_path, meta_path = _paths(path)
    if not meta_path.is_file() or not tensor_path.is_file():
        raise FileNotFoundError(f"store: no complete store at {path} (expected {tensor_path.name} and {meta_path.name})")
    try:
        record = json.loads(meta_path.read_text())
        meta = record["meta"]
    except (json.JSONDecodeError, KeyError) as err:
        raise ValueError(f"store: unreadable metadata at {meta_path}: {err}") from err
    expect = expect or {}
    error = mismatch(path, {k: meta.get(k) for k in expect}, expect)
    if error is not None:
        raise error
    return load_file(str(tensor_path), device=str(device)), meta
