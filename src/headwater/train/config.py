"""The settings of :func:`~headwater.train.ensemble.train_ensemble`: optimiser, loss
normalisation, initialisation and vectorisation choices, validated in one frozen
:class:`TrainConfig`."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from enum import Enum
from typing import Any

__all__ = ["Init", "Normalization", "Optimizer", "TrainConfig", "Vectorize"]


class Optimizer(str, Enum):
    """The optimiser of every member."""

    SGD = "sgd"
    ADAM = "adam"
    LBFGS = "lbfgs"  # full batch, to `tol`; loop only; for convex models


class Normalization(str, Enum):
    """The data term's denominator: ``Σ_i w_i`` (``"mean"``) or ``n`` (``"n"``)."""

    MEAN = "mean"
    N = "n"


class Init(str, Enum):
    """Where a member starts."""

    RESET = "reset"  # every module's reset_parameters() under the member's seed
    COPY = "copy"  # the given model's current parameters (warm start)


class Vectorize(str, Enum):
    """How members are trained."""

    AUTO = "auto"  # vmap unless the model has BatchNorm/Dropout or the optimiser is L-BFGS
    VMAP = "vmap"
    LOOP = "loop"


def _enum(cls: type[Enum], value: Any, name: str) -> Enum:
    try:
        return cls(value)
    except ValueError as err:
        raise ValueError(
            f"{name}: expected one of {[e.value for e in cls]}, got {value!r}"
        ) from err


@dataclass(frozen=True)
class TrainConfig:
    """How each member is (re)trained.

    Attributes:
        optimizer: ``"adam"``, ``"sgd"`` or ``"lbfgs"`` (full batch, to ``tol``).
        lr: learning rate (SGD/Adam).
        epochs: passes over the ``n`` examples (SGD/Adam).
        batch_size: examples per step (SGD/Adam).
        momentum: SGD momentum (``torch.optim.SGD`` convention, no dampening).
        betas, eps: Adam's coefficients.
        normalization: ``"mean"`` (``Σ w ℓ / Σ w``) or ``"n"`` (``Σ w ℓ / n``).
        init: ``"reset"`` (fresh init per member seed) or ``"copy"`` (warm start).
        tol, max_iter: L-BFGS gradient-norm tolerance and iteration cap.
        members_per_pass: members trained (and stored) together.
        vectorize: ``"auto"``, ``"vmap"`` or ``"loop"`` (results agree).
    """

    optimizer: Optimizer | str = Optimizer.ADAM
    lr: float = 1e-3
    epochs: int = 20
    batch_size: int = 64
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    normalization: Normalization | str = Normalization.MEAN
    init: Init | str = Init.RESET
    tol: float = 1e-10
    max_iter: int = 2000
    members_per_pass: int = 16
    vectorize: Vectorize | str = Vectorize.AUTO

    def __post_init__(self) -> None:
        for name, cls in (
            ("optimizer", Optimizer),
            ("normalization", Normalization),
            ("init", Init),
            ("vectorize", Vectorize),
        ):
            object.__setattr__(self, name, _enum(cls, getattr(self, name), name))
        for name in ("epochs", "batch_size", "max_iter", "members_per_pass"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        for name in ("lr", "tol", "eps"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: must be a finite float > 0, got {value!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum: must lie in [0, 1), got {self.momentum!r}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas: expected two floats in [0, 1), got {self.betas!r}")
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        if self.optimizer is Optimizer.LBFGS and self.vectorize is Vectorize.VMAP:
            raise ValueError(
                "vectorize: 'vmap' is not available with optimizer='lbfgs'; use 'auto' or 'loop'"
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            k: (v.value if isinstance(v, Enum) else list(v) if isinstance(v, tuple) else v)
            for k, v in asdict(self).items()
            if k not in ("members_per_pass", "vectorize")
        }
