"""The errors headwater raises for a user's mistake, and the finiteness check.

Every user-facing error is a :class:`HeadwaterError` with a one-line message: the
command line prints it and exits with status 2 (anything else is a bug: exit 1).

- :class:`InputError` — bad data, model or parameters (shapes, NaN/inf values).
- :class:`ConfigError` — a bad option (unknown name, out-of-range value, missing device).
- :class:`StoreError` — a store on disk that cannot be used (damaged, written with other
  settings, or not writable).
- :class:`NumericalError` — a computation that became non-finite or diverged, naming
  the setting to change.

``InputError``, ``ConfigError`` and ``StoreError`` are also ``ValueError`` (and
``NumericalError`` a ``RuntimeError``), so code catching those keeps working.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ConfigError",
    "HeadwaterError",
    "InputError",
    "NonFiniteError",
    "NumericalError",
    "StoreError",
    "check_finite_rows",
    "check_option_names",
]

_SHOWN = 5  # offending indices named in a message


class HeadwaterError(Exception):
    """Base of every user-facing headwater error (one-line message)."""


class InputError(HeadwaterError, ValueError):
    """Bad data, model or parameters."""


class ConfigError(HeadwaterError, ValueError):
    """A bad option or setting."""


class StoreError(HeadwaterError, ValueError):
    """A store on disk that cannot be used as asked."""


class NumericalError(HeadwaterError, RuntimeError):
    """A computation that became non-finite or diverged.

    Attributes:
        non_finite: an operator returned NaN/inf (rather than an iteration diverging).
    """

    def __init__(self, message: str, *, non_finite: bool = False):
        super().__init__(message)
        self.non_finite = non_finite


class NonFiniteError(InputError):
    """A NaN/inf value where values are produced (gradients, factors, scores).

    Attributes:
        rows: the offending example indices (all of them, in order).
    """

    def __init__(self, message: str, rows: tuple[int, ...] = ()):
        super().__init__(message)
        self.rows = rows


def _indices(rows: list[int]) -> str:
    shown = ", ".join(map(str, rows[:_SHOWN]))
    return shown + (f" (and {len(rows) - _SHOWN} more)" if len(rows) > _SHOWN else "")


def check_finite_rows(
    values: Tensor | Iterable[Tensor],
    *,
    what: str,
    name: str,
    offset: int = 0,
    cause: str = "a NaN/inf or extreme value in its inputs, targets or the model's parameters",
) -> None:
    """Raise :class:`NonFiniteError` if any row of ``values [B, ...]`` (or of any of several
    such tensors, rows aligned) holds a NaN/inf.

    The message names the set (``name``, e.g. ``"train"``), ``what`` was computed, the
    first offending example indices (``offset`` + row) and the likely ``cause``. Cost:
    one sum per row (the elementwise test only on rows whose sum is not finite).
    """
    parts = [values] if isinstance(values, Tensor) else list(values)
    if not parts or parts[0].shape[0] == 0:
        return
    finite = parts[0].new_ones(parts[0].shape[0], dtype=torch.bool)
    for part in parts:
        flat = part.reshape(part.shape[0], -1)
        # a NaN/inf makes its row's sum NaN/inf: one fast reduction, then the exact test
        # only on rows whose sum is not finite (a finite row's sum may overflow)
        suspect = (~flat.sum(dim=1).isfinite()).nonzero()[:, 0]
        if len(suspect):
            finite[suspect] &= flat[suspect].isfinite().all(dim=1)
    if bool(finite.all()):
        return
    rows = [int(i) + offset for i in (~finite).nonzero()[:, 0].tolist()]
    raise NonFiniteError(
        f"{name}: the {what} of example{'s' if len(rows) > 1 else ''} {_indices(rows)} "
        f"{'are' if len(rows) > 1 else 'is'} NaN/inf; likely cause: {cause}",
        tuple(rows),
    )


def check_option_names(
    target: Callable[..., Any], options: dict[str, Any], *, what: str, reserved: Iterable[str] = ()
) -> None:
    """Raise :class:`ConfigError` naming the first key of ``options`` that ``target`` (a class
    or function) does not take as a keyword, or takes from another argument (``reserved``),
    and listing the valid ones. ``what`` names the options (e.g. ``"curvature_options"``)."""
    params = inspect.signature(target).parameters
    valid = sorted(
        n
        for n, p in params.items()
        if n != "self"
        and n not in set(reserved)
        and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    )
    for key in options:
        if key not in valid:
            owner = getattr(target, "__name__", str(target))
            raise ConfigError(
                f"{what}: unknown option {key!r} for {owner}; valid: {', '.join(valid) or 'none'}"
            )
