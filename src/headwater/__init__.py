"""headwater: trace a model's predictions back to the training examples that caused them."""

__version__ = "0.1.0"

from headwater.api import influence
from headwater.bars import ProgressBars
from headwater.methods import InfluenceFunction, Scores
from headwater.task import (
    ClassificationTask,
    LanguageModelingTask,
    Measurement,
    RegressionTask,
    Seq2SeqTask,
    Task,
)

__all__ = [
    "ClassificationTask",
    "InfluenceFunction",
    "LanguageModelingTask",
    "Measurement",
    "ProgressBars",
    "RegressionTask",
    "Scores",
    "Seq2SeqTask",
    "Task",
    "__version__",
    "influence",
]
