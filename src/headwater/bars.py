"""Progress bars (tqdm, with ETA) for the one-call API and the command line.

The core reports progress through an optional ``progress(stage, done, total)`` callback
(:mod:`headwater.progress`) and never prints; :class:`ProgressBars` is the callback that
draws the bars. Pass it, or any callable of that shape, as ``progress=`` to the
estimators and curvatures; ``headwater.influence`` makes one itself (``progress=True``,
its default).
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from headwater.distributed import world
from headwater.progress import ProgressFn

__all__ = ["ProgressBars", "as_progress"]

API_DELAY = 1.0
"""Seconds a step of ``headwater.influence`` runs before its bar appears (quick calls stay quiet)."""


class ProgressBars:
    """A ``progress(stage, done, total)`` callback drawing one tqdm bar (with ETA) per stage.

    A stage whose count goes back down (it runs again) gets a fresh bar.

    Args:
        enabled: ``False`` draws nothing.
        delay: seconds a stage runs before its bar is shown (a stage finished sooner
            prints nothing).
    """

    def __init__(self, enabled: bool = True, *, delay: float = 0.0):
        self.enabled = enabled
        self.delay = delay
        self._bars: dict[str, tqdm] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if not self.enabled:
            return
        bar = self._bars.get(stage)
        if bar is not None and (done < bar.n or total != bar.total):
            bar.close()
            bar = None
        if bar is None:
            bar = tqdm(
                total=total,
                desc=stage,
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
                delay=self.delay,
                bar_format="{desc:<26} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
                "[{elapsed}<{remaining}]",
            )
            self._bars[stage] = bar
        bar.update(done - bar.n)
        if done >= total:
            bar.close()
            del self._bars[stage]

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


def as_progress(progress: bool | ProgressFn | None, name: str = "progress") -> ProgressFn | None:
    """The callback for ``progress=``: ``True`` → bars on the first process (after
    :data:`API_DELAY` s), ``False``/``None`` → none, a callable → itself."""
    if progress is None or progress is False:
        return None
    if progress is True:
        return ProgressBars(enabled=world()[0] == 0, delay=API_DELAY)
    if callable(progress):
        return progress
    raise TypeError(
        f"{name}: expected True, False or a callable progress(stage, done, total), got {progress!r}"
    )
