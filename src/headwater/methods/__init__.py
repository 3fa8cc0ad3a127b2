"""Estimators: combine a Task, per-example gradients and a Curvature into scores."""

from headwater.methods.influence import InfluenceFunction
from headwater.methods.scoring import Scores, pairwise, pairwise_top_k

__all__ = ["InfluenceFunction", "Scores", "pairwise", "pairwise_top_k"]
