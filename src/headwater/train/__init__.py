"""Training and retraining: full-batch L-BFGS for convex objectives; many models at once."""

from headwater.train.ensemble import (
    Ensemble,
    TrainConfig,
    ensemble_measurements,
    train_ensemble,
)
from headwater.train.lbfgs import minimize_objective, objective_value
from headwater.train.recorder import Recorder, RunRecord, load_run, replay, with_indices
from headwater.train.sgd import SGDConfig, Trajectory, train_sgd

__all__ = [
    "Ensemble",
    "Recorder",
    "RunRecord",
    "SGDConfig",
    "TrainConfig",
    "Trajectory",
    "ensemble_measurements",
    "load_run",
    "minimize_objective",
    "objective_value",
    "replay",
    "train_ensemble",
    "train_sgd",
    "with_indices",
]
