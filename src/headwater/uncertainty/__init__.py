"""Curvature for uncertainty: local ensembles (extrapolation) and linearised Laplace."""

from headwater.uncertainty.laplace import (
    LaplacePredictive,
    LaplaceState,
    LinearizedLaplace,
    PriorGroups,
    ProbabilityMethod,
)
from headwater.uncertainty.local_ensembles import Prediction, extrapolation_scores, flat_subspace

__all__ = [
    "LaplacePredictive",
    "LaplaceState",
    "LinearizedLaplace",
    "Prediction",
    "PriorGroups",
    "ProbabilityMethod",
    "extrapolation_scores",
    "flat_subspace",
]
