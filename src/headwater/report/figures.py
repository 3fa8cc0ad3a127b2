"""Matplotlib figures of a run, drawn off-screen (Agg) and written as PNG bytes.

Only the object-oriented ``Figure`` API is used: no pyplot, no global backend state.
"""

from __future__ import annotations

import io

import numpy as np
from matplotlib.figure import Figure
from torch import Tensor

from headwater.report.results import RunResult

__all__ = ["distribution_png", "mislabeled_png", "query_png"]

_PRO, _OPP, _FLAG = "#1b7837", "#b2182b", "#e08214"


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _show_image(ax, image: Tensor, title: str, color: str = "black") -> None:
    """A grayscale image ``[H, W]`` with larger values darker (ink on paper, as raw digit
    pixels are), or an RGB image ``[H, W, 3]`` scaled to its own range."""
    pixels = image.float().cpu().numpy()
    if pixels.ndim == 3:
        low, high = pixels.min(), pixels.max()
        ax.imshow((pixels - low) / (high - low if high > low else 1.0), interpolation="nearest")
    else:
        ax.imshow(pixels, cmap="gray_r", interpolation="nearest")
    ax.set_title(title, fontsize=8, color=color)
    ax.set_xticks([])
    ax.set_yticks([])


def query_png(result: RunResult, q: int, pro: list[int], opp: list[int]) -> bytes:
    """The query and its proponents (top row) and opponents (bottom row): images with
    label and score, or, for non-image data, a bar chart of their scores."""
    label = result.label_name(result.query_labels[q])
    pred = (
        ""
        if result.query_predictions is None
        else f", pred {result.label_name(result.query_predictions[q])}"
    )
    scores = result.scores[q]
    if result.train_images is None or result.query_images is None:
        fig = Figure(figsize=(7, 0.35 * (len(pro) + len(opp)) + 1.2))
        ax = fig.add_subplot()
        idx = pro + opp[::-1]
        vals = [float(scores[i]) for i in idx]
        ax.barh(range(len(idx)), vals, color=[_PRO] * len(pro) + [_OPP] * len(opp))
        ax.set_yticks(
            range(len(idx)),
            [f"#{i} (label {result.label_name(result.train_labels[i])})" for i in idx],
            fontsize=8,
        )
        ax.invert_yaxis()
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel("score (positive = proponent)")
        ax.set_title(f"query #{q} (label {label}{pred})", fontsize=10)
        fig.tight_layout()
        return _png(fig)
    cols = max(len(pro), len(opp)) + 1
    fig = Figure(figsize=(1.25 * cols, 3.4))
    axes = fig.subplots(2, cols, squeeze=False)
    _show_image(axes[0, 0], result.query_images[q], f"query #{q}\nlabel {label}{pred}")
    axes[1, 0].axis("off")
    axes[1, 0].text(
        0.5,
        0.5,
        "proponents ↑\nopponents ↓",
        ha="center",
        va="center",
        fontsize=8,
        transform=axes[1, 0].transAxes,
    )
    for row, (idx, color) in enumerate(((pro, _PRO), (opp, _OPP))):
        for c in range(1, cols):
            ax = axes[row, c]
            if c - 1 >= len(idx):
                ax.axis("off")
                continue
            i = idx[c - 1]
            title = (
                f"#{i} label {result.label_name(result.train_labels[i])}\n{float(scores[i]):+.3g}"
            )
            _show_image(ax, result.train_images[i], title, color)
    fig.tight_layout()
    return _png(fig)


def mislabeled_png(result: RunResult, idx: list[int]) -> bytes:
    """The training examples with the largest self-influence, with their labels."""
    assert result.self_influence is not None
    si = result.self_influence
    flipped = result.flipped
    if result.train_images is None:
        fig = Figure(figsize=(7, 0.3 * len(idx) + 1.2))
        ax = fig.add_subplot()
        colors = [_FLAG if flipped is not None and bool(flipped[i]) else "#4d4d4d" for i in idx]
        ax.barh(range(len(idx)), [float(si[i]) for i in idx], color=colors)
        ax.set_yticks(
            range(len(idx)),
            [f"#{i} (label {result.label_name(result.train_labels[i])})" for i in idx],
            fontsize=8,
        )
        ax.invert_yaxis()
        ax.set_xlabel("self-influence")
        fig.tight_layout()
        return _png(fig)
    cols = min(8, len(idx))
    rows = -(-len(idx) // cols)
    fig = Figure(figsize=(1.25 * cols, 1.65 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for n, ax in enumerate(axes.flat):
        if n >= len(idx):
            ax.axis("off")
            continue
        i = idx[n]
        known = flipped is not None and bool(flipped[i])
        title = f"#{i} label {result.label_name(result.train_labels[i])}\n{float(si[i]):.3g}" + (
            " *" if known else ""
        )
        _show_image(ax, result.train_images[i], title, _FLAG if known else "black")
    fig.tight_layout()
    return _png(fig)


def distribution_png(result: RunResult) -> bytes:
    """Histograms of every score and, where computed, of the self-influence."""
    panels = 2 if result.self_influence is not None else 1
    fig = Figure(figsize=(5 * panels, 3.2))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    values = result.scores.detach().double().cpu().numpy().ravel()
    ax = axes[0]
    ax.hist(values, bins=100, color="#4d4d4d")
    ax.set_yscale("log")
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel("score (positive = proponent)")
    ax.set_ylabel("count (log)")
    ax.set_title(
        f"{values.size:,} scores ({result.n_query} queries x {result.n_train} train)", fontsize=9
    )
    if result.self_influence is not None:
        si = result.self_influence.detach().double().cpu().numpy()
        ax = axes[1]
        bins = np.linspace(si.min(), si.max(), 60) if si.max() > si.min() else 10
        ax.hist(si, bins=bins, color="#4d4d4d", label="all")
        if result.flipped is not None and bool(result.flipped.any()):
            ax.hist(
                si[result.flipped.cpu().numpy()],
                bins=bins,
                color=_FLAG,
                label="known flipped label",
            )
            ax.legend(fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("self-influence")
        ax.set_title("self-influence of the training examples", fontsize=9)
    fig.tight_layout()
    return _png(fig)
