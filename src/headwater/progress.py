"""Progress reporting for long steps, as a callback (the core never prints)."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["ProgressFn", "report"]

ProgressFn = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: ``done`` of ``total`` units of ``stage`` are finished."""


def report(progress: ProgressFn | None, stage: str, done: int, total: int) -> None:
    if progress is not None:
        progress(stage, done, total)
