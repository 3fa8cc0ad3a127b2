"""On-disk state: tensor dicts (safetensors) with a JSON sidecar, written atomically.

``save(path, tensors, meta)`` writes ``path.safetensors`` and ``path.json`` through
temporary files and renames, the sidecar last, so a half-written store is never
presented as complete; the sidecar records the tensor file's size and checksum
(BLAKE2b). ``load(path, expect=...)`` refuses a store whose settings differ from what
the caller expects (:class:`StoreMismatchError`) and one whose file is damaged —
truncated, oversized, altered or unreadable (:class:`StoreDamagedError`). A write the
system refuses (a full disk) raises :class:`~headwater.errors.StoreError` and leaves
the earlier store in place.
"""

from __future__ import annotations

import hashlib
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
from headwater.errors import StoreError
from headwater.version import __version__

__all__ = [
    "StoreDamagedError",
    "StoreMismatchError",
    "atomic_write_bytes",
    "exists",
    "file_digest",
    "load",
    "mismatch",
    "on_every_rank",
    "prefix",
    "save",
    "write_error",
]

T = TypeVar("T")


class StoreMismatchError(StoreError):
    """A store on disk was written with other settings than the ones requested.

    Attributes:
        keys: the settings that differ (``"context.model"`` for a nested one).
    """

    def __init__(self, message: str, keys: tuple[str, ...] = ()):
        super().__init__(message)
        self.keys = keys


class StoreDamagedError(StoreError):
    """A store's file is truncated, oversized, altered or unreadable (recompute it)."""


def write_error(path: Any, err: OSError) -> StoreError:
    """The one-line error for a write the system refused (e.g. a full disk)."""
    return StoreError(
        f"store: could not write {path}: {err.strerror or err}; the earlier store (if any) is unchanged"
    )


def file_digest(path: Path) -> str:
    """BLAKE2b (16 bytes, hex) of a file's bytes, read in blocks."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as fh:
        while block := fh.read(1 << 23):
            digest.update(block)
    return digest.hexdigest()


def mismatch(
    path: Any, stored: dict[str, Any], wanted: dict[str, Any], absent: frozenset[str] = frozenset()
) -> StoreMismatchError | None:
    """A :class:`StoreMismatchError` naming every differing setting, or ``None``; ``absent``:
    the settings the store does not record (compared as ``None``, named as not recorded)."""
    flat_s, flat_w = _flatten(stored), _flatten(wanted)  # nested settings compared key by key
    keys = sorted(k for k in set(flat_s) | set(flat_w) if flat_s.get(k) != flat_w.get(k))
    if not keys:
        return None

    def was(key: str) -> str:
        if key in absent:
            return "nothing (not recorded: a store of an older headwater)"
        return repr(flat_s.get(key))

    detail = "; ".join(f"{k}: stored {was(k)}, requested {flat_w.get(k)!r}" for k in keys[:4])
    more = f" (and {len(keys) - 4} more)" if len(keys) > 4 else ""
    return StoreMismatchError(
        f"store: {path} was written with other {', '.join(keys)}: {detail}{more}; "
        "delete it or use another path",
        tuple(keys),
    )


def on_every_rank(open_store: Callable[[], T], path: Any) -> T:
    """``open_store()``, failing on every rank when it fails on any.

    Under ``torch.distributed`` each rank may open its own file (``path``): when one
    rank's raises, the others raise too instead of going on into a collective step
    that rank never reaches — :class:`StoreMismatchError` on every rank when any
    failure is a mismatch and each is a mismatch or damage, :class:`StoreDamagedError`
    when each is damage (so the ranks can refit together), else the failing rank's own
    error and ``RuntimeError`` on the others (collective; with one process it is just
    ``open_store()``)."""
    error: Exception | None = None
    try:
        result = open_store()
    except Exception as err:  # any failure: the other ranks must not wait for this one
        error = err
    if all_ranks(error is None):
        return result
    if all_ranks(error is None or isinstance(error, StoreMismatchError | StoreDamagedError)):
        if all_ranks(not isinstance(error, StoreMismatchError)):
            raise error or StoreDamagedError(f"store: another rank's file beside {path} is damaged")
        raise (
            error
            if isinstance(error, StoreMismatchError)
            else StoreMismatchError(  # e.g. the CLI refits
                f"store: a rank's file beside {path} was written with other settings; "
                "delete the store or use another path"
            )
        )
    if error is not None:
        raise error
    raise RuntimeError(
        f"store: another rank failed to open its file beside {path} (see that rank's error)"
    )


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (JSON-normalised leaves)."""
    value = _normalise(value)
    if not isinstance(value, dict) or not value:  # an empty dict stays a leaf ({} != None)
        return {prefix.rstrip("."): value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(_flatten(item, f"{prefix}{key}."))
    return out


def prefix(path: str | os.PathLike) -> Path:
    """A store's path as given by a user: a file prefix (``runs/ekfac`` is written as
    ``runs/ekfac.json`` and ``runs/ekfac.safetensors``, other files as ``runs/ekfac-*``),
    not a folder, which would put the files beside it (``/tmp`` as ``/tmp.json``)."""
    text = os.fspath(path)
    base = Path(text)
    if text.endswith(("/", os.sep)) or base.is_dir() or not base.name:
        raise StoreError(
            f"store: {text!r} is a folder; give a file prefix inside it, e.g. "
            f"{os.path.join(text, 'scores')!r} (written as <prefix>.json, "
            "<prefix>.safetensors and <prefix>-*)"
        )
    return base


def _paths(path: str | os.PathLike) -> tuple[Path, Path]:
    base = prefix(path)
    return base.with_name(base.name + ".safetensors"), base.with_name(base.name + ".json")


def _publish(tmp: str, target: Path) -> None:
    """Give a temporary file the usual permissions (mkstemp makes it 0600), then rename it."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, target)


def _write_temp(target: Path, data: bytes) -> str:
    """``data`` in a new temporary file beside ``target`` (synced to disk); its path."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return tmp


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` via a temporary file in the same folder and a rename."""
    tmp = _write_temp(target, data)
    try:
        _publish(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _own_storage(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Contiguous CPU tensors, each with storage of its own: safetensors refuses tensors
    that share memory (e.g. query labels sliced from the training labels)."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for name, value in tensors.items():
        value = value.detach().contiguous().cpu()
        pointer = value.untyped_storage().data_ptr()
        if pointer in seen or value.untyped_storage().nbytes() != value.nbytes:
            value = value.clone()
        seen.add(value.untyped_storage().data_ptr())
        out[name] = value
    return out


def save(path: str | os.PathLike, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Save a tensor dict and its settings at ``path`` (two files, sidecar last).

    Both files are written to temporary files first and only then renamed over the
    earlier ones, so a failing write (e.g. a full disk) leaves the earlier store as it
    was and raises :class:`~headwater.errors.StoreError` in one line."""
    tensor_path, meta_path = _paths(path)
    temps: list[str] = []
    try:
        tensor_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            dir=tensor_path.parent, prefix=f".{tensor_path.name}.", suffix=".tmp"
        )
        os.close(fd)
        temps.append(tmp)
        save_file(_own_storage(tensors), tmp)
        record = {
            "headwater_version": __version__,
            "meta": meta,
            "file": {"bytes": os.path.getsize(tmp), "blake2b": file_digest(Path(tmp))},
        }
        temps.append(
            _write_temp(
                meta_path, json.dumps(record, indent=2, sort_keys=True, default=str).encode()
            )
        )
        _publish(temps[0], tensor_path)
        _publish(temps[1], meta_path)
    except OSError as err:
        raise write_error(tensor_path, err) from err
    finally:
        for tmp in temps:
            Path(tmp).unlink(missing_ok=True)


def exists(path: str | os.PathLike) -> bool:
    tensor_path, meta_path = _paths(path)
    return tensor_path.is_file() and meta_path.is_file()


def _normalise(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


def load(
    path: str | os.PathLike,
    *,
    expect: dict[str, Any] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load ``(tensors, meta)`` from ``path``.

    Args:
        expect: settings that must equal the stored ones (keys absent from the store count
            as different).

    Raises:
        FileNotFoundError: if the store is missing or incomplete.
        StoreMismatchError: if a setting in ``expect`` differs, naming it.
        StoreDamagedError: if the file's size or checksum is not the one written, or it is unreadable.
    """
    tensor_path, meta_path = _paths(path)
    if not meta_path.is_file() or not tensor_path.is_file():
        raise FileNotFoundError(
            f"store: no complete store at {path} (expected {tensor_path.name} and {meta_path.name})"
        )
    try:
        record = json.loads(meta_path.read_text())
        meta, recorded = record["meta"], record.get("file") or {}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise StoreDamagedError(f"store: {meta_path} is damaged (unreadable: {err})") from err
    expect = expect or {}
    absent = frozenset(k for k in expect if k not in meta)
    error = mismatch(path, {k: meta.get(k) for k in expect}, expect, absent)
    if error is not None:
        raise error
    size = tensor_path.stat().st_size
    if "blake2b" not in recorded:
        raise StoreDamagedError(
            f"store: {tensor_path} has no recorded checksum (an older version's store)"
        )
    if size != recorded.get("bytes"):
        raise StoreDamagedError(
            f"store: {tensor_path} is damaged ({size} bytes, {recorded.get('bytes')} written)"
        )
    if file_digest(tensor_path) != recorded["blake2b"]:
        raise StoreDamagedError(f"store: {tensor_path} is damaged (its bytes fail their checksum)")
    try:
        return load_file(str(tensor_path), device=str(device)), meta
    except Exception as err:  # safetensors' own errors: a header the checksum could not catch
        raise StoreDamagedError(
            f"store: {tensor_path} is damaged ({' '.join(str(err).split())})"
        ) from err
