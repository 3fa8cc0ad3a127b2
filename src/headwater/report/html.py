"""``index.html`` plus PNG figures: a report folder that opens without a server.

Machine-readable hooks for tests and scripts: every row of a proponent/opponent
table carries ``data-query``, ``data-kind``, ``data-rank`` and ``data-train-index``.
"""

from __future__ import annotations

import json
import os
import time
from html import escape
from pathlib import Path
from typing import Any

import torch

from headwater import store
from headwater.report import figures
from headwater.report.results import RunResult, top_indices
from headwater.version import __version__

__all__ = ["render"]

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;max-width:1100px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ddd;padding:.2em .6em;text-align:right}
th{background:#f4f4f4}td.l,th.l{text-align:left}tr.proponent td.s{color:#1b7837}tr.opponent td.s{color:#b2182b}
img{max-width:100%;border:1px solid #eee}pre{background:#f7f7f7;padding:.8em;overflow-x:auto;font-size:.85em}
.note{color:#555;font-size:.9em}.pair{display:flex;gap:2em;flex-wrap:wrap}
"""


def _write_png(folder: Path, name: str, data: bytes) -> str:
    store.atomic_write_bytes(folder / name, data)
    return name


def _kv_table(items: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><th class='l'>{escape(str(k))}</th><td class='l'>{escape(_fmt(v))}</td></tr>"
        for k, v in items.items()
    )
    return f"<table>{rows}</table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _score_rows(result: RunResult, q: int, kind: str, idx: list[int]) -> str:
    rows = []
    for r, i in enumerate(idx, start=1):
        label = escape(result.label_name(result.train_labels[i]))
        mark = " *" if result.flipped is not None and bool(result.flipped[i]) else ""
        rows.append(
            f"<tr class='{kind}' data-query='{q}' data-kind='{kind}' data-rank='{r}' data-train-index='{i}'>"
            f"<td>{r}</td><td>{i}</td><td>{label}{mark}</td><td class='s'>{float(result.scores[q, i]):+.4g}</td></tr>"
        )
    head = "<tr><th>rank</th><th>train index</th><th>label</th><th>score</th></tr>"
    return f"<table><caption>{kind}s</caption>{head}{''.join(rows)}</table>"


def _query_section(result: RunResult, folder: Path, q: int, pro: list[int], opp: list[int]) -> str:
    png = _write_png(folder, f"query_{q}.png", figures.query_png(result, q, pro, opp))
    label = escape(result.label_name(result.query_labels[q]))
    pred = ""
    if result.query_predictions is not None:
        pred = f", predicted {escape(result.label_name(result.query_predictions[q]))}"
    return (
        f"<section class='query' data-query='{q}'><h3>Test example #{q} (label {label}{pred})</h3>"
        f"<img src='{png}' alt='test example {q}, its proponents and opponents'>"
        f"<div class='pair'>{_score_rows(result, q, 'proponent', pro)}{_score_rows(result, q, 'opponent', opp)}</div>"
        "</section>"
    )


def _mislabeled_section(result: RunResult, folder: Path, n: int) -> str:
    if result.self_influence is None:
        return "<p class='note'>Self-influence was not computed for this run.</p>"
    order = torch.argsort(result.self_influence, descending=True)[:n].tolist()
    png = _write_png(folder, "mislabeled.png", figures.mislabeled_png(result, order))
    rows = []
    for r, i in enumerate(order, start=1):
        known = result.flipped is not None and bool(result.flipped[i])
        rows.append(
            f"<tr class='mislabeled' data-rank='{r}' data-train-index='{i}'><td>{r}</td><td>{i}</td>"
            f"<td>{escape(result.label_name(result.train_labels[i]))}</td>"
            f"<td>{float(result.self_influence[i]):.4g}</td><td>{'yes' if known else ''}</td></tr>"
        )
    note = ""
    if result.flipped is not None and bool(result.flipped.any()):
        n_flipped = int(result.flipped.sum())
        found = sum(bool(result.flipped[i]) for i in order)
        note = (
            f"<p>{n_flipped} training labels were deliberately flipped for this run; {found} of them are "
            f"among the {len(order)} examples with the largest self-influence (chance: "
            f"{len(order) * n_flipped / result.n_train:.1f}). Flipped examples are marked *.</p>"
        )
    return (
        "<p>Self-influence <code>∇ℓ(z_i)ᵀ H⁻¹ ∇ℓ(z_i)</code> is large for examples the model can only fit by "
        "bending towards them: unusual inputs and wrong labels. Check these first.</p>"
        f"{note}<img src='{png}' alt='training examples with the largest self-influence'>"
        "<table><tr><th>rank</th><th>train index</th><th>label</th><th>self-influence</th><th>known flipped</th></tr>"
        f"{''.join(rows)}</table>"
    )


def render(
    result: RunResult, folder: str | os.PathLike, *, k: int = 5, n_mislabeled: int = 16
) -> Path:
    """Write ``folder/index.html`` and its PNG figures; returns the HTML path.

    Args:
        result: the run to show.
        folder: the report folder (created if missing).
        k: proponents and opponents shown per test example.
        n_mislabeled: training examples listed by self-influence.
    """
    if not isinstance(k, int) or k <= 0:
        raise ValueError(f"top_k: must be a positive integer, got {k!r}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    pro, opp = top_indices(result.scores, k)
    shown = list(result.shown) or list(range(min(3, result.n_query)))
    queries = "".join(
        _query_section(result, folder, q, pro[q].tolist(), opp[q].tolist()) for q in shown
    )
    dist = _write_png(folder, "distribution.png", figures.distribution_png(result))
    settings = _flatten(result.settings)
    timings = {**result.timings, "report": time.perf_counter() - start}
    timing_rows = {name: f"{sec:.2f} s" for name, sec in timings.items()}
    config = result.config
    command = config.get("reproduce", "")
    summary = {
        "training examples": result.n_train,
        "test examples (queries)": result.n_query,
        **({"test accuracy": config["accuracy"]} if "accuracy" in config else {}),
    }
    doc = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>headwater report</title>
<style>{_CSS}</style></head><body>
<h1>Which training examples made the model predict this?</h1>
<p class="note">headwater {escape(__version__)} · {escape(str(config.get("command", "")))} ·
written {escape(time.strftime("%Y-%m-%d %H:%M:%S"))}</p>
{_kv_table(summary)}
<p><b>Sign convention.</b> <code>score[q, i] = ∇m(q)ᵀ H⁻¹ ∇ℓ(i)</code>, with H the curvature of the mean
training loss. Removing training example i changes the measurement of test example q by about
<code>+score/n</code>: with the loss as measurement a <span style="color:#1b7837">positive score marks a
proponent</span> (it helped: removing it raises the test loss) and a <span style="color:#b2182b">negative score
an opponent</span>.</p>
<h2>Test examples: top {k} proponents and opponents</h2>
{queries}
<h2>Likely mislabeled training examples</h2>
{_mislabeled_section(result, folder, n_mislabeled)}
<h2>Distribution of scores</h2>
<img src="{dist}" alt="histograms of the scores and self-influence">
<h2>Method and settings</h2>
{_kv_table(settings)}
<h2>Timings</h2>
{_kv_table(timing_rows)}
<h2>Reproduce</h2>
<pre>{escape(command)}</pre>
<details><summary>Run configuration</summary><pre>{escape(json.dumps(config, indent=2, default=str))}</pre></details>
</body></html>
"""
    path = folder / "index.html"
    store.atomic_write_bytes(path, doc.encode("utf-8"))
    return path
