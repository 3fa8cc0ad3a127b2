"""The options of :class:`~headwater.methods.metagradient.Metagradient` validated, for the class
itself and for ``headwater.influence(method="metagradient", method_options=...)`` (whose
errors name ``method_options``), before any step runs."""

from __future__ import annotations

from typing import Any

import torch

from headwater.errors import ConfigError
from headwater.train.steps import check_normalization

__all__ = ["check_options"]


def check_options(options: dict[str, Any], what: str = "") -> dict[str, Any]:
    """The metagradient's options among ``options`` (``hessian_free``, ``normalization``,
    ``query_block``, ``dtype``) validated and as the class takes them: ``dtype`` a floating
    ``torch.dtype`` or its name (``"float64"``, ``"torch.float32"``, as the command line
    gives it); others are left as given.

    Raises:
        TypeError / ValueError naming the option (after ``what: ``, e.g. ``method_options``),
        before any step runs.
    """
    name = (lambda key: f"{what}: {key}") if what else (lambda key: key)
    out = dict(options)
    if "hessian_free" in out and not isinstance(out["hessian_free"], bool):
        raise TypeError(
            f"{name('hessian_free')}: expected a bool (True or False), got {out['hessian_free']!r}"
        )
    block = out.get("query_block")
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block <= 0):
        raise ValueError(
            f"{name('query_block')}: must be a positive integer or None, got {block!r}"
        )
    if "normalization" in out:
        try:
            out["normalization"] = check_normalization(out["normalization"])
        except ValueError as err:
            raise ConfigError(f"{what}: {err}" if what else str(err)) from err
    if out.get("dtype") is not None:
        out["dtype"] = _dtype(out["dtype"], name("dtype"))
    return out


def _dtype(value: Any, name: str) -> torch.dtype:
    """A floating ``torch.dtype`` from itself or its name (``"float64"`` or ``"torch.float64"``)."""
    found = getattr(torch, value.removeprefix("torch."), None) if isinstance(value, str) else value
    if isinstance(found, torch.dtype) and found.is_floating_point:
        return found
    message = f"{name}: expected a torch.dtype or one of 'float32', 'float64', got {value!r}"
    raise (ConfigError if isinstance(value, str | torch.dtype) else TypeError)(message)
