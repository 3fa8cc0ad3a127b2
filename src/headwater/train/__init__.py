"""Training and retraining: full-batch L-BFGS for convex objectives; many models at once."""

from headwater.train.ensemble import (
    Ensemble,
    TrainConfig,
    ensemble_measurements,
    train_ensemble,
)
from headwater.train.lbfgs import minimize_objective, objective_value

__all__ = [
    "Ensemble",
    "TrainConfig",
    "ensemble_measurements",
    "minimize_objective",
    "objective_value",
    "train_ensemble",
]
