"""Per-example gradients (``torch.func``), the flat parameter layout."""

from headwater.gradients.flat import ParamLayout
from headwater.gradients.per_example import Objective, per_example_gradients, stack_gradients

__all__ = ["Objective", "ParamLayout", "per_example_gradients", "stack_gradients"]
