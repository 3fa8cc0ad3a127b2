"""Self-contained HTML reports of an attribution run (front end; imports the core only).

:class:`RunResult` is what a run saves (through :mod:`headwater.store`) and what a
report is rendered from; :func:`render` writes ``index.html`` plus PNG figures.
"""

from headwater.report.html import render
from headwater.report.results import RunResult, load_result, save_result, top_indices
from headwater.report.tables import format_top_k_table, write_top_k_csv

__all__ = [
    "RunResult",
    "format_top_k_table",
    "load_result",
    "render",
    "save_result",
    "top_indices",
    "write_top_k_csv",
]
