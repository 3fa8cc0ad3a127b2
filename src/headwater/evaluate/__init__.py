"""Ground truth by retraining, and metrics comparing scores with it."""

from headwater.evaluate.loo import LOOResult, leave_one_out, measure

__all__ = ["LOOResult", "leave_one_out", "measure"]
