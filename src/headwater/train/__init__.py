"""Training and retraining: full-batch L-BFGS for convex objectives."""

from headwater.train.lbfgs import minimize_objective, objective_value

__all__ = ["minimize_objective", "objective_value"]
