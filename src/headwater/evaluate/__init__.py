"""Ground truth by retraining, and metrics comparing scores with it."""

from headwater.evaluate.detection import (
    DetectionCurve,
    auprc,
    detection_curve,
    precision_at_k,
    recall_at_fraction,
)
from headwater.evaluate.lds import LDSGroundTruth, LDSResult, lds, lds_ground_truth
from headwater.evaluate.loo import LOOResult, leave_one_out, measure
from headwater.evaluate.pbrf import PBRFResult, pbrf
from headwater.evaluate.retrain_loo import RetrainLOOResult, retrain_leave_one_out
from headwater.evaluate.single_model import single_model_ground_truth

__all__ = [
    "DetectionCurve",
    "LDSGroundTruth",
    "LDSResult",
    "LOOResult",
    "PBRFResult",
    "RetrainLOOResult",
    "auprc",
    "detection_curve",
    "lds",
    "lds_ground_truth",
    "leave_one_out",
    "measure",
    "pbrf",
    "precision_at_k",
    "recall_at_fraction",
    "retrain_leave_one_out",
    "single_model_ground_truth",
]
