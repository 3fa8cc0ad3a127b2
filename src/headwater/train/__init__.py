"""Training and retraining: full-batch L-BFGS for convex objectives; many models at once."""

from headwater.train.ensemble import (
    Ensemble,
    TrainConfig,
    ensemble_measurements,
    train_ensemble,
)
from headwater.train.lbfgs import minimize_objective, objective_value
from headwater.train.sgd import SGDConfig, Trajectory, train_sgd

__all__ = [
    "Ensemble",
    "SGDConfig",
    "TrainConfig",
    "Trajectory",
    "ensemble_measurements",
    "minimize_objective",
    "objective_value",
    "train_ensemble",
    "train_sgd",
]
