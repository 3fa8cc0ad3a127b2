"""headwater: trace a model's predictions back to the training examples that caused them."""

__version__ = "0.1.0"

from headwater.api import influence  # noqa: E402
from headwater.methods import InfluenceFunction, Scores  # noqa: E402
from headwater.task import ClassificationTask, Measurement, RegressionTask, Task  # noqa: E402

__all__ = [
    "ClassificationTask",
    "InfluenceFunction",
    "Measurement",
    "RegressionTask",
    "Scores",
    "Task",
    "__version__",
    "influence",
]
