"""The one curvature interface every approximation implements.

``fit(model, task, data)`` streams over ``data`` and fills a frozen record of
tensors and settings; ``solve(V) ≈ (M + damping·I)⁻¹ V`` and ``matvec(V) ≈
(M + damping·I) V`` only read it, for a batch ``V [K, P]``. ``M`` is the Hessian,
GGN or empirical Fisher of the mean training objective (see ``operators``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from headwater import store
from headwater.curvature.defaults import DEFAULT_RELATIVE_DAMPING, DampingScale
from headwater.curvature.defaults import default_damping as rule
from headwater.curvature.operators import MatrixKind
from headwater.data import DataLike, num_examples
from headwater.errors import NonFiniteError
from headwater.gradients.flat import ParamLayout
from headwater.gradients.functional import check_device
from headwater.gradients.per_example import per_example_gradients
from headwater.progress import ProgressFn
from headwater.task import Task

__all__ = [
    "DEFAULT_RELATIVE_DAMPING",
    "Curvature",
    "Memory",
    "ProblemSize",
    "check_damping",
    "default_damping",
]


def default_damping(mean_eigenvalue: float) -> float:
    """The library's default damping of a whole-space curvature:
    ``DEFAULT_RELATIVE_DAMPING × max(trace(M)/P, 0)``, the ``"full"`` case of the one
    rule in :mod:`~headwater.curvature.defaults` (where the measurements are).

    Every whole-space curvature with ``damping=None`` applies it to its own estimate of
    ``trace(M)/P`` (exact eigenvalues, a Hutchinson estimate, the diagonal, the window of
    gradients, the projected trace); the low-rank ones damp by their smallest kept
    eigenvalue and K-FAC/EK-FAC each block by ``0.1 × mean(Λ_block)`` (same module)."""
    return rule(mean_eigenvalue, DampingScale.FULL)


def check_damping(damping: float | None) -> float | None:
    """Validate a user's damping: ``None`` or a finite float >= 0."""
    if damping is None:
        return None
    if isinstance(damping, bool) or not isinstance(damping, int | float):
        raise TypeError(f"damping: expected a float >= 0 or None, got {type(damping).__name__}")
    if not math.isfinite(damping) or damping < 0:
        raise ValueError(f"damping: must be a finite float >= 0, got {damping}")
    return float(damping)


@dataclass(frozen=True)
class ProblemSize:
    """The sizes a curvature's memory model reads (filled by :func:`headwater.plan.plan`).

    Attributes:
        num_params: analysed parameters ``P``.
        n_train: training examples.
        rhs: vectors solved at once (``min(n_query, query_chunk)``).
        itemsize: bytes per element of the parameters' dtype.
        outputs: model outputs per example ``C``.
        blocks: ``(out_features, width)`` of each supported layer (empty if some analysed
            parameter is outside one: no Kronecker-factored curvature then).
        rank, n_iter: of the low-rank curvatures.
    """

    num_params: int
    n_train: int
    rhs: int
    itemsize: int
    outputs: int
    blocks: tuple[tuple[int, int], ...]
    rank: int = 50
    n_iter: int = 100

    @property
    def linearisations(self) -> int:
        """Bytes of the cached linearisations of the streaming operators (outputs only, <= 512 MiB)."""
        return min(512 * 2**20, 4 * self.n_train * self.outputs * self.itemsize)


@dataclass(frozen=True)
class Memory:
    """Bytes a curvature keeps (``stored``: its fitted state) and adds to an estimator's
    working set while solving (``working``: beyond the gradients, queries and scores)."""

    stored: int
    working: int
    note: str = ""


_Self = TypeVar("_Self", bound="Curvature")


def _diagnose(
    model: nn.Module, task: Task, data: DataLike, chunk_size: int, err: Exception
) -> None:
    """After a failed fit: one pass over the per-example gradients, raising the error that
    names a non-finite example; else, for a non-finite fit, a :class:`NonFiniteError`
    saying so. Returns for other failures."""
    for _ in per_example_gradients(model, task, data, chunk_size=chunk_size, name="train"):
        pass
    if isinstance(
        err, NonFiniteError | torch.linalg.LinAlgError | np.linalg.LinAlgError
    ) or getattr(err, "non_finite", False):
        raise NonFiniteError(
            f"train: the fitted curvature is not finite ({' '.join(str(err).split())}) although "
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
        if any(
            (isinstance(t, Tensor) and not bool(t.isfinite().all()))
            or (field.name == "damping" and isinstance(t, float) and not math.isfinite(t))
            for t in parts
        ):
            raise NonFiniteError(f"curvature: the fitted {name} `{field.name}` holds NaN/inf")
    return state


class Curvature(ABC):
    """An approximation of the curvature of the mean training objective.

    Args:
        kind: ``"ggn"`` (default; positive semi-definite), ``"hessian"`` or ``"ef"``.
        damping: λ added to the diagonal; ``None`` picks :func:`default_damping` at fit
            time.
        chunk_size: examples per vectorised step while fitting.
    """

    name: ClassVar[str]
    has_eigen: ClassVar[bool] = False
    solve_streams_data: ClassVar[bool] = False
    """``solve``/``matvec`` pass over the training data (CG, LiSSA): under
    ``torch.distributed`` they are collective, so every rank must call them together
    with the same vectors."""
    kinds: ClassVar[tuple[MatrixKind, ...]] = tuple(MatrixKind)
    damping_in_state_only: ClassVar[bool] = False
    """The fitted state depends on the damping only through its ``damping`` field, so
    :meth:`with_damping` re-derives a copy without a pass over the data."""
    block_features: ClassVar[bool] = False
    """Block-diagonal over supported layers with a ``blocks`` attribute and
    ``solve_blocks({module: [B, out, width]})`` (K-FAC, EK-FAC): estimators may score
    from per-layer features instead of flat gradients."""

    def __init__(
        self,
        *,
        kind: MatrixKind | str = MatrixKind.GGN,
        damping: float | None = None,
        chunk_size: int = 64,
    ):
        try:
            self.kind = MatrixKind(kind)
        except ValueError as err:
            raise ValueError(
                f"kind: expected one of {[k.value for k in MatrixKind]}, got {kind!r}"
            ) from err
        if self.kind not in self.kinds:
            raise ValueError(
                f"kind: {type(self).__name__} supports {[k.value for k in self.kinds]}, got {kind!r}"
            )
        self.damping = check_damping(damping)
        if not isinstance(chunk_size, int) or chunk_size <= 0:
            raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
        self.chunk_size = chunk_size
        self.state: Any = None
        self.layout: ParamLayout | None = None
        self.n_examples = 0
        self.fit_notes: dict[str, Any] = {}
        """How the last fit went, for the estimators' settings (e.g. the matrix-free
        curvatures' ``"curvature_product"``: how each product is computed, and why)."""

    @classmethod
    def memory(cls, size: ProblemSize) -> Memory | None:
        """This curvature's memory model for a problem of ``size`` (``None``: not applicable,
        e.g. a Kronecker-factored curvature without supported layers)."""
        raise NotImplementedError(f"{cls.__name__} declares no memory model (Curvature.memory)")

    @classmethod
    def preconditioner(cls, kind: MatrixKind, damping: float, chunk_size: int) -> Curvature | None:
        """An unfitted instance approximating ``M + damping·I`` of ``kind`` cheaply enough to
        precondition CG and LiSSA, or ``None`` when this class cannot (the default)."""
        return None

    # -- fitting -------------------------------------------------------------------
    def fit(
        self: _Self,
        model: nn.Module,
        task: Task,
        data: DataLike,
        *,
        progress: ProgressFn | None = None,
    ) -> _Self:
        """Fit to ``model`` on ``data``; returns ``self``. The model is left unchanged."""
        self.n_examples = num_examples(data, "train")
        self.layout = ParamLayout.of(task.parameters(model))
        self.fit_notes = {}
        try:
            self.state = _finite_state(self.name, self._fit(model, task, data, progress))
        except (
            RuntimeError,
            NonFiniteError,
            np.linalg.LinAlgError,
        ) as err:  # name the examples behind it
            _diagnose(model, task, data, self.chunk_size, err)
            raise
        return self

    @abstractmethod
    def _fit(
        self, model: nn.Module, task: Task, data: DataLike, progress: ProgressFn | None
    ) -> Any:
        """Compute the frozen state record."""

    def with_damping(
        self: _Self,
        damping: float,
        *,
        model: nn.Module | None = None,
        task: Task | None = None,
        data: DataLike | None = None,
    ) -> _Self:
        """A fitted copy with damping λ = ``damping`` (``self`` is unchanged).

        Where the state depends on λ only through its value (``damping_in_state_only``)
        the copy is re-derived at once; otherwise (LiSSA's scale and preconditioner,
        K-FAC's eigenvalue shifts, M-FAC's Woodbury factor) it is refitted on ``model``,
        ``task`` and ``data``, which must then be given.

        Raises:
            ValueError: naming ``damping`` for a bad value, ``data`` when a refit is needed
                and the data are missing.
        """
        self._check_fitted()
        if check_damping(damping) is None:
            raise ValueError("damping: with_damping needs a float >= 0, got None")
        twin = copy.copy(self)
        twin.damping = float(damping)
        if self.damping_in_state_only:
            twin.state = dataclasses.replace(self.state, damping=float(damping))
            return twin
        if model is None or task is None or data is None:
            raise ValueError(
                f"data: {type(self).__name__} refits to change its damping; pass model, task and "
                "data to with_damping"
            )
        return twin.fit(model, task, data)

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
            raise RuntimeError(
                f"{type(self).__name__} is not fitted: call .fit(model, task, data) first"
            )

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
        return {
            "curvature": self.name,
            "kind": self.kind.value,
            "damping": self.damping,
            "chunk_size": self.chunk_size,
        }

    def scoring_settings(self) -> dict[str, Any]:
        """Options that change how scores are computed from the fitted state, not the state
        itself (recorded in an estimator's settings, not in the store's key)."""
        return {}

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
        meta = {
            **self.settings(),
            "layout": self.layout.to_dict(),
            "n_examples": self.n_examples,
            "state": scalars,
            "tensor_dicts": groups,
            "context": context,
        }
        store.save(path, tensors, meta)

    def load(
        self: _Self,
        path: str | os.PathLike,
        *,
        layout: ParamLayout | None = None,
        device: str | torch.device = "cpu",
        context: dict[str, Any] | None = None,
    ) -> _Self:
        """Read a state saved with the same settings (and parameter layout and ``context``,
        if given; else ``StoreMismatchError``)."""
        device = check_device(device)
        expect = self.settings()
        if layout is not None:
            expect["layout"] = layout.to_dict()
        if context is not None:
            expect["context"] = context
        tensors, meta = store.load(path, expect=expect, device=device)
        self.layout = ParamLayout(
            tuple(meta["layout"]["names"]), tuple(tuple(s) for s in meta["layout"]["shapes"])
        )
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
