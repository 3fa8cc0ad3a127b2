"""Estimators: combine a Task, per-example gradients and a Curvature into scores."""

from headwater.methods.influence import InfluenceFunction
from headwater.methods.scoring import Scores, pairwise, pairwise_top_k
from headwater.methods.tracin import Checkpoint, TracIn

__all__ = ["Checkpoint", "InfluenceFunction", "Scores", "TracIn", "pairwise", "pairwise_top_k"]
