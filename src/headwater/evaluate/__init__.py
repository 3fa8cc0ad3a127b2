"""Ground truth by retraining, and metrics comparing scores with it."""

from headwater.evaluate.lds import LDSGroundTruth, LDSResult, lds, lds_ground_truth
from headwater.evaluate.loo import LOOResult, leave_one_out, measure
from headwater.evaluate.pbrf import PBRFResult, pbrf
from headwater.evaluate.retrain_loo import RetrainLOOResult, retrain_leave_one_out

__all__ = [
    "LDSGroundTruth",
    "LDSResult",
    "LOOResult",
    "PBRFResult",
    "RetrainLOOResult",
    "lds",
    "lds_ground_truth",
    "leave_one_out",
    "measure",
    "pbrf",
    "retrain_leave_one_out",
]
