"""Estimators: combine a Task, per-example gradients and a Curvature into scores."""

from headwater.methods.ame import AMEResult, ame
from headwater.methods.ensemble_scores import EnsembleScores, ensemble_scores
from headwater.methods.hydra import Hydra
from headwater.methods.influence import InfluenceFunction
from headwater.methods.scoring import Scores, pairwise, pairwise_top_k
from headwater.methods.tracin import Checkpoint, TracIn
from headwater.methods.unlearning import UnlearnGradient, unlearn

__all__ = [
    "AMEResult",
    "Checkpoint",
    "EnsembleScores",
    "Hydra",
    "InfluenceFunction",
    "Scores",
    "TracIn",
    "UnlearnGradient",
    "ame",
    "ensemble_scores",
    "pairwise",
    "pairwise_top_k",
    "unlearn",
]
