"""Inverse-curvature approximations behind one interface (see ``base.Curvature``).

Adding a curvature is one file in this package (a ``Curvature`` subclass with its
``name``) and one line in ``REGISTRY`` below: the line makes the class importable
from here and puts it in ``CURVATURES`` under its ``name``, which is what
``headwater.influence(curvature=...)``, the command line, damping selection and
``headwater.plan`` read.
"""

from importlib import import_module

from headwater.curvature.base import Curvature
from headwater.curvature.operators import MatrixKind, curvature_matvec, dense_curvature

REGISTRY = (
    "exact:Exact",
    "cg:CG",
    "lissa:LiSSA",
    "arnoldi:Arnoldi",
    "lanczos:Lanczos",
    "nystrom:Nystrom",
    "kfac:KFAC",
    "kfac:EKFAC",
    "mfac:MFAC",
    "diagonal:Diagonal",
    "identity:Identity",
)
"""``"module:Class"`` for each curvature, ``module`` a file of this package."""


def _register(entries: tuple[str, ...]) -> dict[str, type[Curvature]]:
    classes: dict[str, type[Curvature]] = {}
    for entry in entries:
        module, _, class_name = entry.partition(":")
        cls = getattr(import_module(f"{__package__}.{module}"), class_name)
        if not (isinstance(cls, type) and issubclass(cls, Curvature)):
            raise TypeError(f"REGISTRY entry {entry!r} is not a Curvature subclass")
        if cls.name in classes:
            raise ValueError(f"REGISTRY entry {entry!r}: the name {cls.name!r} is taken")
        classes[cls.name] = cls
        globals()[class_name] = cls
    return classes


CURVATURES: dict[str, type[Curvature]] = _register(REGISTRY)
"""Name -> class, for ``headwater.influence(curvature=...)``."""

__all__ = [
    "CURVATURES",
    "REGISTRY",
    "Curvature",
    "MatrixKind",
    "curvature_matvec",
    "dense_curvature",
    *(cls.__name__ for cls in CURVATURES.values()),
]
