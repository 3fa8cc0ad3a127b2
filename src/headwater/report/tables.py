"""Plain-text and CSV tables of the top proponents and opponents."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from headwater import store
from headwater.report.results import RunResult, top_indices

__all__ = ["format_top_k_table", "write_top_k_csv"]


def format_top_k_table(result: RunResult, queries: list[int] | tuple[int, ...], k: int) -> str:
    """A fixed-width table per query: rank, then (index, label, score) of each
    proponent and opponent."""
    pro, opp = top_indices(result.scores, k)
    lines = []
    head = f"{'rank':>4}  {'proponent':>9} {'label':>5} {'score':>10}   {'opponent':>9} {'label':>5} {'score':>10}"
    for q in queries:
        title = f"test #{q}  label {result.label_name(result.query_labels[q])}"
        if result.query_predictions is not None:
            title += f"  predicted {result.label_name(result.query_predictions[q])}"
        lines += [title, head, "-" * len(head)]
        for r in range(pro.shape[1]):
            i, j = int(pro[q, r]), int(opp[q, r])
            lines.append(
                f"{r + 1:>4}  {i:>9} {result.label_name(result.train_labels[i]):>5} "
                f"{float(result.scores[q, i]):>+10.3g}   {j:>9} "
                f"{result.label_name(result.train_labels[j]):>5} {float(result.scores[q, j]):>+10.3g}"
            )
        lines.append("")
    return "\n".join(lines)


def write_top_k_csv(path: str | os.PathLike, result: RunResult, k: int) -> Path:
    """Write ``query, kind, rank, train_index, train_label, score`` rows for every query
    (``kind`` is ``proponent`` or ``opponent``, rank 1 = strongest)."""
    pro, opp = top_indices(result.scores, k)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["query", "query_label", "kind", "rank", "train_index", "train_label", "score"])
    for q in range(result.n_query):
        q_label = result.label_name(result.query_labels[q])
        for kind, idx in (("proponent", pro), ("opponent", opp)):
            for r in range(idx.shape[1]):
                i = int(idx[q, r])
                writer.writerow(
                    [
                        q,
                        q_label,
                        kind,
                        r + 1,
                        i,
                        result.label_name(result.train_labels[i]),
                        f"{float(result.scores[q, i]):.9g}",
                    ]
                )
    path = Path(path)
    store.atomic_write_bytes(path, buf.getvalue().encode())
    return path
