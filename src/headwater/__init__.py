"""headwater: trace a model's predictions back to the training examples that caused them."""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from headwater.version import __version__

if TYPE_CHECKING:
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

_LAZY = {
    "influence": "headwater.api",
    "InfluenceFunction": "headwater.methods",
    "Scores": "headwater.methods",
    "ProgressBars": "headwater.bars",
    **dict.fromkeys(
        (
            "ClassificationTask",
            "LanguageModelingTask",
            "Measurement",
            "RegressionTask",
            "Seq2SeqTask",
            "Task",
        ),
        "headwater.task",
    ),
}
"""Public names loaded on first use, so importing a subpackage (``headwater.store``) loads
only what it needs."""


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'headwater' has no attribute {name!r}")


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
