"""The estimators ``headwater.influence(method=...)`` knows, and its validated settings.

:class:`AttributionSettings` holds every option of one call, validated in
``__post_init__`` (errors name the field); the CLI builds the same object, so the
rules live here once. :data:`METHODS` maps a method name to a :class:`MethodSpec`:
the settings fields the method reads and a builder returning a fitted
:class:`~headwater.methods.estimator.Estimator`. Adding a method is one builder in
its own module and one line in :data:`METHODS`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from headwater.curvature import CURVATURES
from headwater.curvature.base import check_damping
from headwater.curvature.operators import MatrixKind
from headwater.data import DataLike
from headwater.errors import check_option_names
from headwater.gradients.projection import KroneckerProjection, RandomProjection
from headwater.methods.auto import choose_curvature
from headwater.methods.estimator import Estimator, check_top_k
from headwater.methods.hydra import Hydra
from headwater.methods.influence import InfluenceFunction
from headwater.methods.metagradient import Metagradient
from headwater.methods.metagradient_options import check_options as check_metagradient_options
from headwater.methods.projected import ProjectedInfluence
from headwater.methods.tracin import Checkpoint, TracIn, run_checkpoints
from headwater.progress import ProgressFn, report
from headwater.task import Task
from headwater.train.recorder import RunRecord
from headwater.train.sgd import Trajectory

__all__ = [
    "METHODS",
    "AttributionSettings",
    "Inputs",
    "MethodSpec",
    "check_curvature_options",
    "check_inputs",
]

Projection = int | RandomProjection | KroneckerProjection


@dataclass(frozen=True)
class Inputs:
    """What an estimator is given besides its settings (objects, not settings).

    Attributes:
        checkpoints: TracIn's :class:`~headwater.methods.tracin.Checkpoint` list.
        trajectory: a recorded run (:func:`headwater.train.sgd.train_sgd`), for HYDRA.
        run: a run recorded by :class:`~headwater.train.recorder.Recorder`, for the metagradient
            (and TracIn without ``checkpoints``: its recorded checkpoints).
        progress: optional ``progress(stage, done, total)`` callback.
    """

    checkpoints: Sequence[Checkpoint] | None = None
    trajectory: Trajectory | None = None
    run: RunRecord | None = None
    progress: ProgressFn | None = None


Builder = Callable[[nn.Module, Task, "AttributionSettings", Inputs, DataLike], Estimator]


@dataclass(frozen=True)
class MethodSpec:
    """One method: the optional settings it reads (any other one set raises), its
    ``build(model, task, settings, inputs, train) -> fitted Estimator``, the
    :class:`Inputs` it reads (``inputs``: any other one given raises, :func:`check_inputs`)
    and, when it reads ``method_options``, the class whose keyword arguments they are and
    ``check_options(options, what) -> options``, validating their values (errors named after
    ``what``, ``"method_options"``) and converting them to what the class takes."""

    build: Builder
    options: frozenset[str]
    self_influence: bool = True
    option_class: type | None = None
    inputs: frozenset[str] = frozenset()
    check_options: Callable[[dict[str, Any], str], dict[str, Any]] | None = None


@dataclass(frozen=True)
class AttributionSettings:
    """The options of :func:`headwater.influence` (documented there), validated.

    Raises:
        ValueError / TypeError naming the field for a bad value or an option the
        chosen method does not use.
    """

    method: str = "influence"
    curvature: str | None = None
    damping: float | None = None
    projection: Projection | None = None
    top_k: int | None = None
    kind: str = "ggn"
    self_influence: bool = False
    chunk_size: int = 64
    query_chunk: int = 256
    query_batch: int | None = None
    curvature_options: dict[str, Any] | None = None
    renormalize: bool = False
    store: str | os.PathLike | None = None
    read_only_store: bool = False
    method_options: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method: expected one of {list(METHODS)}, got {self.method!r}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(field.default, bool) and not isinstance(value, bool):
                raise TypeError(f"{field.name}: expected a bool (True or False), got {value!r}")
        object.__setattr__(self, "damping", check_damping(self.damping))
        if self.curvature == "auto":  # the same as None: chosen at fit (methods/auto.py)
            object.__setattr__(self, "curvature", None)
        if self.top_k is not None:
            check_top_k(self.top_k)
        for name in ("chunk_size", "query_chunk") + (
            ("query_batch",) if self.query_batch is not None else ()
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if self.kind not in [k.value for k in MatrixKind]:
            raise ValueError(
                f"kind: expected one of {[k.value for k in MatrixKind]}, got {self.kind!r}"
            )
        for name in ("curvature_options", "method_options"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, dict):
                raise TypeError(f"{name}: expected a dict, got {type(value).__name__}")
        spec = METHODS[self.method]
        for field in dataclasses.fields(self):
            if (
                field.name in _OPTIONAL
                and field.name not in spec.options
                and getattr(self, field.name) != field.default
            ):
                users = [name for name, s in METHODS.items() if field.name in s.options]
                raise ValueError(
                    f"{field.name}: not used by method={self.method!r} (used by: {', '.join(users)})"
                )
        if self.self_influence and not spec.self_influence:
            raise ValueError(f"self_influence: not defined for method={self.method!r}")
        if self.method == "influence":
            _check_influence(self)
        if self.method_options:
            check_option_names(
                spec.option_class,
                self.method_options,
                what="method_options",
                reserved=_METHOD_RESERVED,
            )
            if spec.check_options is not None:
                checked = spec.check_options(self.method_options, "method_options")
                object.__setattr__(self, "method_options", checked)

    def as_kwargs(self) -> dict[str, Any]:
        """The fields as keyword arguments of :func:`headwater.influence` (not copied)."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def resolved_curvature(self) -> str | None:
        """The curvature name given, ``"exact"`` with ``projection``, or ``None``: the most
        accurate one the budget allows, chosen at fit (:func:`~headwater.methods.auto.choose_curvature`)."""
        if self.curvature is not None:
            return self.curvature
        return "exact" if self.projection is not None else None


_OPTIONAL = (
    "curvature",
    "damping",
    "projection",
    "kind",
    "query_batch",
    "curvature_options",
    "renormalize",
    "store",
    "read_only_store",
    "method_options",
)
"""Settings only some methods read (the others are common to every method)."""

_METHOD_RESERVED = ("model", "task", "run", "store", "progress")
"""Arguments of a method's class that :func:`headwater.influence` passes itself."""

_INPUT_TYPES: dict[str, tuple[type, str]] = {
    "trajectory": (Trajectory, "a headwater Trajectory (headwater.train.train_sgd)"),
    "run": (RunRecord, "a headwater RunRecord (Recorder.finish / load_run)"),
}
"""The type of an :class:`Inputs` object checked up front (TracIn checks its checkpoints)."""


def check_inputs(method: str, inputs: Inputs) -> None:
    """Raise ``ValueError`` naming an input of :class:`Inputs` given to a ``method`` that does
    not read it (listing the methods that do), ``TypeError`` naming one of the wrong type."""
    spec = METHODS[method]
    given = {
        f.name: getattr(inputs, f.name)
        for f in dataclasses.fields(Inputs)
        if f.name != "progress" and getattr(inputs, f.name) is not None
    }
    for name in given:
        if name not in spec.inputs:
            users = [m for m, s in METHODS.items() if name in s.inputs]
            raise ValueError(f"{name}: not used by method={method!r} (used by: {', '.join(users)})")
    for name, value in given.items():
        kind, what = _INPUT_TYPES.get(name, (object, ""))
        if not isinstance(value, kind):
            raise TypeError(f"{name}: expected {what}, got {type(value).__name__}")


def check_curvature_options(
    curvature: str | None, options: dict[str, Any] | None, *, projected: bool
) -> None:
    """``ConfigError`` naming an option the curvature class (or, ``projected``, the projected
    estimator) does not take, listing the valid ones; ``curvature`` is a known name (``None``:
    the automatic choice, whose options are EK-FAC's)."""
    if projected:
        reserved = (
            "model",
            "task",
            "projection",
            "kind",
            "damping",
            "chunk_size",
            "query_chunk",
            "progress",
        )
        check_option_names(
            ProjectedInfluence, options or {}, what="curvature_options", reserved=reserved
        )
    else:
        check_option_names(
            CURVATURES[curvature or "ekfac"],
            options or {},
            what="curvature_options",
            reserved=("kind", "damping"),
        )


def _check_influence(s: AttributionSettings) -> None:
    if s.projection is not None:
        if isinstance(s.projection, bool) or not isinstance(s.projection, Projection):
            raise TypeError(
                "projection: expected a positive int, a RandomProjection or a KroneckerProjection, "
                f"got {s.projection!r}"
            )
        if s.curvature not in (None, "exact"):
            raise ValueError(
                f"curvature: with projection the projected curvature is dense (k x k); pass "
                f"curvature='exact' or None, not {s.curvature!r}"
            )
        if s.query_batch is not None:
            raise ValueError(
                "query_batch: batches the preconditioned queries of method='influence' without "
                "projection (its queries are k-dimensional)"
            )
        options = s.curvature_options or {}
        if s.store is not None and options.get("store") not in (None, s.store):
            raise ValueError("store: given twice (also in curvature_options) with different paths")
    elif s.curvature is not None and s.curvature not in CURVATURES:
        raise ValueError(f"curvature: expected one of {sorted(CURVATURES)}, got {s.curvature!r}")
    check_curvature_options(s.curvature, s.curvature_options, projected=s.projection is not None)


def _influence(
    model: nn.Module, task: Task, s: AttributionSettings, inputs: Inputs, train: DataLike
) -> Estimator:
    options = dict(s.curvature_options or {})
    if s.projection is not None:
        if s.store is not None:
            options["store"] = s.store
        if s.read_only_store:
            options["read_only"] = True
        return ProjectedInfluence(
            model,
            task,
            s.projection,
            kind=s.kind,
            damping=s.damping,
            chunk_size=s.chunk_size,
            query_chunk=s.query_chunk,
            progress=inputs.progress,
            **options,
        ).fit(train)
    name, notes = s.curvature, None
    if name is None:  # the most accurate curvature the budget allows, said in one line
        choice = choose_curvature(model, task, train, kind=s.kind)
        report(inputs.progress, choice.reason, 1, 1)
        name, options, notes = choice.name, {**choice.options, **options}, choice.to_dict()
    curvature = CURVATURES[name](kind=s.kind, damping=s.damping, **options)
    return InfluenceFunction(
        model,
        task,
        curvature,
        chunk_size=s.chunk_size,
        query_chunk=s.query_chunk,
        query_batch=s.query_batch,
        progress=inputs.progress,
        notes=notes,
    ).fit(train, store=s.store, read_only=s.read_only_store)


def _tracin(
    model: nn.Module, task: Task, s: AttributionSettings, inputs: Inputs, train: DataLike
) -> Estimator:
    checkpoints = inputs.checkpoints
    if checkpoints is not None and inputs.run is not None:
        raise ValueError(
            "run: method='tracin' takes its checkpoints from checkpoints= or from a recorded "
            "run, not both"
        )
    if checkpoints is None and inputs.run is not None:
        checkpoints = run_checkpoints(inputs.run)
    if checkpoints is None:
        raise ValueError(
            "checkpoints: method='tracin' needs the training checkpoints (or a recorded run)"
        )
    return TracIn(
        model,
        task,
        checkpoints,
        renormalize=s.renormalize,
        chunk_size=s.chunk_size,
        query_chunk=s.query_chunk,
        progress=inputs.progress,
    )


def _hydra(
    model: nn.Module, task: Task, s: AttributionSettings, inputs: Inputs, train: DataLike
) -> Estimator:
    if inputs.trajectory is None:
        raise ValueError(
            "trajectory: method='hydra' needs a recorded run (headwater.train.train_sgd)"
        )
    return Hydra(model, task, inputs.trajectory, progress=inputs.progress)


def _metagradient(
    model: nn.Module, task: Task, s: AttributionSettings, inputs: Inputs, train: DataLike
) -> Estimator:
    if inputs.run is None:
        raise ValueError(
            "run: method='metagradient' needs a recorded run (headwater.train.Recorder)"
        )
    return Metagradient(
        model,
        task,
        inputs.run,
        store=s.store,
        progress=inputs.progress,
        **(s.method_options or {}),
    )


METHODS: dict[str, MethodSpec] = {
    "influence": MethodSpec(
        _influence,
        frozenset(
            {
                "curvature",
                "damping",
                "projection",
                "kind",
                "query_batch",
                "curvature_options",
                "store",
                "read_only_store",
            }
        ),
    ),
    "tracin": MethodSpec(
        _tracin, frozenset({"renormalize"}), inputs=frozenset({"checkpoints", "run"})
    ),
    "hydra": MethodSpec(
        _hydra, frozenset(), self_influence=False, inputs=frozenset({"trajectory"})
    ),
    "metagradient": MethodSpec(
        _metagradient,
        frozenset({"store", "method_options"}),
        self_influence=False,
        option_class=Metagradient,
        inputs=frozenset({"run"}),
        check_options=check_metagradient_options,
    ),
}
"""Method name -> :class:`MethodSpec`; a new method is one line here."""
