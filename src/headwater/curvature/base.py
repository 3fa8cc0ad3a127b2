"""The one curvature interface every approximation implements.

``fit(model, task, data)`` streams over ``data`` and fills a frozen record of
tensors and settings; ``solve(V) ≈ (M + damping·I)⁻¹ V`` and ``matvec(V) ≈
(M + damping·I) V`` only read it, for a batch ``V [K, P]``. ``M`` is the Hessian,
GGN or empirical Fisher of the mean training objective (see ``operators``).
"""

from __future__ import annotations

import dataclasses
import math
import os
from abc import ABC, abstractmethod
from typing import Any, ClassVar, Self

import numpy as np
import torch
from torch import Tensor, nn

from headwater import store
from headwater.curvature.operators import MatrixKind
from headwater.data import DataLike, num_examples
from headwater.errors import NonFiniteError
from headwater.gradients.flat import ParamLayout
from headwater.gradients.per_example import per_example_gradients
from headwater.progress import ProgressFn
from headwater.task import Task

__all__ = ["DEFAULT_RELATIVE_DAMPING", "Curvature", "check_damping"]

DEFAULT_RELATIVE_DAMPING = 1e-3
"""With ``damping=None``, damping = this × the mean eigenvalue (trace / P) of ``M``."""


def check_damping(damping: float | None) -> float | None:
    """Validate a user's damping: ``None`` or a finite float >= 0."""
    if damping is None:
        return None
    if isinstance(damping, bool) or not isinstance(damping, int | float):
        raise TypeError(f"damping: expected a float >= 0 or None, got {type(damping).__name__}")
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping: must be a finite float >= 0, got {damping}")
    return float(damping)


def _diagnose(model: nn.Module, task: Task, data: DataLike, chunk_size: int, err: Exception) -> None:
    """After a failed fit: one pass over the per-example gradients, raising the error that
    names a non-finite example; else, for a non-finite fit, a :class:`NonFiniteError`
    saying so. Returns for other failures."""
    for _ in per_example_gradients(model, task, data, chunk_size=chunk_size, name="train"):
        pass
    if isinstance(err, NonFiniteError | torch.linalg.LinAlgError | np.linalg.LinAlgError) \
            or getattr(err, "non_finite", False):
        raise NonFiniteError(f"train: the fitted curvature is not finite ({' '.join(str(err).split())}) although "
                             "every per-example gradient is; likely cause: extreme values in the training inputs "
                             "(whose squares overflow) or in the model's parameters: rescale them or use float64"
                             ) from err


def _finite_state(name: str, state: Any) -> Any:
    """``state``, after checking that its tensors and its damping are finite (other float
    fields may hold NaN for "unknown")."""
    if not dataclasses.is_dataclass(state):
        return state
    for field in dataclasses.fields(state):
        value = getattr(state, field.name)
        parts = value.values() if isinstance(value, dict) else [value]
        if any((isinstance(t, Tensor) and not bool(t.isfinite().all()))
               or (field.name == "damping" and isinstance(t, float) and not math.isfinite(t)) for t in parts):
            raise NonFiniteError(f"curvature: the fitted {name} `{field.name}` holds NaN/inf")
    return state


class Curvature(ABC):
    """An approximation of the curvature of the mean training objective.

    Args:
        kind: ``"ggn"`` (default; positive semi-definite), ``"hessian"`` or ``"ef"``.
        damping: λ added to the diagonal; ``None`` picks
            ``DEFAULT_RELATIVE_DAMPING × trace(M)/P`` at fit time.
        chunk_size: examples per vectorised step while fitting.
    """

    name: ClassVar[str]
    has_eigen: ClassVar[bool] = False
    solve_streams_data: ClassVar[bool] = False
    """``solve``/``matvec`` pass over the training data (CG, LiSSA): under
    ``torch.distributed`` they are collective, so every rank must call them together
    with the same vectors."""
    kinds: ClassVar[tuple[MatrixKind, ...]] = tuple(MatrixKind)

    def __init__(self, *, kind: MatrixKind | str = MatrixKind.GGN, damping: float | None = None,
                 chunk_size: int = 64):
        try:
            self.kind = MatrixKind(kind)
        except ValueError as err:
            raise ValueError(f"kind: expected one of {[k.value for k in MatrixKind]}, got {kind!r}") from err
        if self.kind not in self.kinds:
            raise ValueError(f"kind: {type(self).__name__} supports {[k.value for k in self.kinds]}, got {kind!r}")
        self.damping = check_damping(damping)
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.state: Any = None
        self.layout: ParamLayout | None = None
        self.n_examples = 0

    # -- fitting -------------------------------------------------------------------
    def fit(self, model: nn.Module, task: Task, data: DataLike, *,
            progress: ProgressFn | None = None) -> Self:
        """Fit to ``model`` on ``data``; returns ``self``. The model is left unchanged."""
        self.n_examples = num_examples(data, "train")
        self.layout = ParamLayout.of(task.parameters(model))
        try:
            self.state = _finite_state(self.name, self._fit(model, task, data, progress))
        except (RuntimeError, NonFiniteError, np.linalg.LinAlgError) as err:  # name the examples behind it
            _diagnose(model, task, data, self.chunk_size, err)
            raise
        return self

    @abstractmethod
    def _fit(self, model: nn.Module, task: Task, data: DataLike, progress: ProgressFn | None) -> Any:
        """Compute the frozen state record."""

    # -- reading -------------------------------------------------------------------
    @property
    def fitted_damping(self) -> float:
        self._check_fitted()
        return float(self.state.damping)

    def solve(self, v: Tensor) -> Tensor:
        """``(M + λI)⁻¹ V`` for ``V [K, P]`` (or ``[P]``)."""
        return self._apply(v, self._solve)

    def matvec(self, v: Tensor) -> Tensor:
        """``(M + λI) V`` for ``V [K, P]`` (or ``[P]``)."""
        return self._apply(v, self._matvec)

    def eigen(self) -> tuple[Tensor, Tensor]:
        """Eigenvalues ``[k]`` (descending) and eigenvectors ``[k, P]`` of undamped ``M``."""
        raise NotImplementedError(f"{type(self).__name__} has no eigendecomposition")

    @abstractmethod
    def _solve(self, v: Tensor) -> Tensor: ...

    @abstractmethod
    def _matvec(self, v: Tensor) -> Tensor: ...

    def _check_fitted(self) -> None:
        if self.state is None:
            raise RuntimeError(f"{type(self).__name__} is not fitted: call .fit(model, task, data) first")

    def _apply(self, v: Tensor, fn) -> Tensor:
        self._check_fitted()
        if not isinstance(v, Tensor):
            raise TypeError(f"v: expected a Tensor, got {type(v).__name__}")
        p = self.layout.num_params
        if v.shape[-1] != p or v.dim() not in (1, 2):
            raise ValueError(f"v: expected shape [K, {p}] or [{p}], got {tuple(v.shape)}")
        out = fn(v.reshape(-1, p))
        return out.reshape(v.shape)

    # -- persistence ---------------------------------------------------------------
    def settings(self) -> dict[str, Any]:
        """Everything that determines the fitted state (compared when loading)."""
        return {"curvature": self.name, "kind": self.kind.value, "damping": self.damping,
                "chunk_size": self.chunk_size}

    def save(self, path: str | os.PathLike, *, context: dict[str, Any] | None = None) -> None:
        """Write the fitted state through :mod:`headwater.store`; ``context`` (JSON) is
        stored with it and compared by :meth:`load` (e.g. which model and data were fitted)."""
        self._check_fitted()
        tensors, scalars, groups = {}, {}, []
        for field in dataclasses.fields(self.state):
            value = getattr(self.state, field.name)
            if isinstance(value, dict) and all(isinstance(t, Tensor) for t in value.values()):
                groups.append(field.name)  # a dict of tensors (e.g. per module): "field/key"
                tensors.update({f"{field.name}/{k}": t for k, t in value.items()})
            else:
                (tensors if isinstance(value, Tensor) else scalars)[field.name] = value
        meta = {**self.settings(), "layout": self.layout.to_dict(), "n_examples": self.n_examples,
                "state": scalars, "tensor_dicts": groups, "context": context}
        store.save(path, tensors, meta)

    def load(self, path: str | os.PathLike, *, layout: ParamLayout | None = None,
             device: str | torch.device = "cpu", context: dict[str, Any] | None = None) -> Self:
        """Read a state saved with the same settings (and parameter layout and ``context``,
        if given; else ``StoreMismatchError``)."""
        expect = self.settings()
        if layout is not None:
            expect["layout"] = layout.to_dict()
        if context is not None:
            expect["context"] = context
        tensors, meta = store.load(path, expect=expect, device=device)
        self.layout = ParamLayout(tuple(meta["layout"]["names"]),
                                  tuple(tuple(s) for s in meta["layout"]["shapes"]))
        self.n_examples = int(meta["n_examples"])
        groups: dict[str, dict[str, Tensor]] = {g: {} for g in meta.get("tensor_dicts", [])}
        plain = {}
        for key, value in tensors.items():
            head, sep, tail = key.partition("/")
            if sep and head in groups:
                groups[head][tail] = value
            else:
                plain[key] = value
        self.state = self._state_type()(**plain, **groups, **meta["state"])
        return self

    @classmethod
    @abstractmethod
    def _state_type(cls) -> type: ...
