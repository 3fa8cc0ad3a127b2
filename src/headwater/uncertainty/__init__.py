"""Curvature for uncertainty: local ensembles (extrapolation) and linearised Laplace."""

from headwater.uncertainty.local_ensembles import Prediction, extrapolation_scores, flat_subspace

__all__ = ["Prediction", "extrapolation_scores", "flat_subspace"]
