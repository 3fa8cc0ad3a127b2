"""Estimators: combine a Task, per-example gradients and a Curvature into scores."""

from headwater.methods.ame import AMEResult, ame
from headwater.methods.ensemble_scores import EnsembleScores, ensemble_scores
from headwater.methods.estimator import Estimator
from headwater.methods.hydra import Hydra
from headwater.methods.influence import InfluenceFunction
from headwater.methods.metagradient import Metagradient
from headwater.methods.mislabels import MislabelRanking, detect_mislabels, mislabel_ranking
from headwater.methods.renormalized import Renormalization, RenormalizedInfluence
from headwater.methods.scoring import Scores, pairwise, pairwise_top_k
from headwater.methods.target_identification import (
    TargetIdentification,
    anomaly_scores,
    identify_target,
)
from headwater.methods.tracin import Checkpoint, TracIn
from headwater.methods.unlearning import UnlearnGradient, unlearn

__all__ = [
    "AMEResult",
    "Checkpoint",
    "EnsembleScores",
    "Estimator",
    "Hydra",
    "InfluenceFunction",
    "Metagradient",
    "MislabelRanking",
    "Renormalization",
    "RenormalizedInfluence",
    "Scores",
    "TargetIdentification",
    "TracIn",
    "UnlearnGradient",
    "ame",
    "anomaly_scores",
    "detect_mislabels",
    "ensemble_scores",
    "identify_target",
    "mislabel_ranking",
    "pairwise",
    "pairwise_top_k",
    "unlearn",
]
