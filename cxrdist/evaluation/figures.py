"""The report's figures: matplotlib (Agg, object-oriented API: no pyplot state), one PNG each.

Sized for the page: a figure inch is 96 CSS px there (html.figure), a figure is at most ~7.6 in wide so that it shows
1:1 on an 800 px window, and no text in it is smaller than MIN_FONT_PT, which is the page's smallest body text
(`save` raises any smaller text to it, and records the smallest size in the PNG, where the report test reads it)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from matplotlib.text import Text
from sklearn.metrics import roc_curve

DENSITY = 2  # PNG pixels per CSS pixel: sharp on high-density screens (html.figure declares it in srcset)
CSS_PX_PER_INCH = 96
DPI = CSS_PX_PER_INCH * DENSITY
MIN_FONT_PT = 9.0  # = 12 CSS px at 1:1, the report's smallest body text (html.py: an interval's .ci)
NARROW_PAGE_PX = 768  # the content width of an 800 px window (html.py's narrow padding): a wider figure shrinks there
PAD_INCHES = 0.1  # savefig's border around the tight bounding box
MIN_FONT_KEY = "cxrdist:min-font-pt"  # PNG text chunk: the smallest text size in the figure, in points
PANEL_IN = 1.85  # one panel of a 4-wide grid: 4 fit 7.6 in
FOLD_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
PALETTE = {"train": "#3b6ea8", "uncertain": "#a9c4e4", "test": "#d1495b"}


def save(fig: Figure, path: Path | BinaryIO) -> Path | BinaryIO:
    """A PNG at `path`, or into a binary file object, with no text below the floor (`raise_small_text`)."""
    smallest = raise_small_text(fig)
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight", pad_inches=PAD_INCHES, facecolor="white",
                metadata={MIN_FONT_KEY: f"{smallest:.2f}"})
    return path


def shown_texts(fig: Figure) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def raise_small_text(fig: Figure) -> float:
    """Sets every text smaller than the floor to the floor; returns the smallest text size (points). The floor is
    MIN_FONT_PT, raised by the factor a figure wider than NARROW_PAGE_PX shrinks by on an 800 px page."""
    canvas = FigureCanvasAgg(fig)
    floor = MIN_FONT_PT
    for _ in range(3):  # larger text widens the figure a little: a pass or two more settle it
        canvas.draw()
        width_px = (fig.get_tightbbox(canvas.get_renderer()).width + 2 * PAD_INCHES) * CSS_PX_PER_INCH
        floor = MIN_FONT_PT * max(1.0, width_px / NARROW_PAGE_PX)
        small = [t for t in shown_texts(fig) if t.get_fontsize() < floor - 1e-6]
        if not small:
            break
        for text in small:
            text.set_fontsize(floor)
    return min((t.get_fontsize() for t in shown_texts(fig)), default=floor)


def short(label: str, width: int = 14) -> str:
    """Label names wrapped onto lines of ~width characters for axes."""
    return "\n".join(textwrap.wrap(label, width)) or label


def label_frequency(path: Path, labels: Sequence[str], train_pos: np.ndarray, train_unc: np.ndarray, train_n: int,
                    test_prev: np.ndarray | None) -> Path:
    """Horizontal bars: positive and uncertain prevalence over the training folds; test prevalence as dots."""
    order = np.argsort(train_pos)
    y = np.arange(len(labels))
    fig = Figure(figsize=(7.2, 0.36 * len(labels) + 1.5))
    ax = fig.subplots()
    pos, unc = 100 * train_pos[order] / max(train_n, 1), 100 * train_unc[order] / max(train_n, 1)
    ax.barh(y, pos, color=PALETTE["train"], label="positive (training folds)")
    ax.barh(y, unc, left=pos, color=PALETTE["uncertain"], label="uncertain (training folds)")
    if test_prev is not None:
        ax.scatter(100 * test_prev[order], y, color=PALETTE["test"], zorder=3, s=22, label="positive (test split)")
    right = pos + unc if test_prev is None else np.maximum(pos + unc, 100 * test_prev[order])
    for yi, p, r in zip(y, pos, right):
        ax.text(r + 0.8, yi, f"{p:.1f}%", va="center", fontsize=MIN_FONT_PT, color="#333")
    ax.set_yticks(y, [labels[i] for i in order], fontsize=MIN_FONT_PT)
    ax.tick_params(labelsize=MIN_FONT_PT)
    ax.set_xlabel("images (%)", fontsize=10)
    ax.set_xlim(0, max(10.0, float(right.max()) * 1.2))
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="lower right", fontsize=MIN_FONT_PT, frameon=False)
    return save(fig, path)


def image_grid(count: int, columns: int, cell: tuple[float, float]):
    """A figure of `count` image cells, `columns` per row, axes off; returns (figure, the flat axes)."""
    rows = max(1, math.ceil(count / columns))
    fig = Figure(figsize=(cell[0] * columns, cell[1] * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes.flat


def sample_grid(path: Path, images: Sequence[np.ndarray], captions: Sequence[str], titles: Sequence[str], columns: int = 4) -> Path:
    """Captions are wrapped to the cell here (at most three lines)."""
    fig, axes = image_grid(len(images), columns, (PANEL_IN, 2.55))
    for ax, image, caption, title in zip(axes, images, captions, titles):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(short(title, 24), fontsize=MIN_FONT_PT, color="#555")
        ax.text(0.5, -0.03, wrapped_lines(caption, 22, 3), transform=ax.transAxes, ha="center", va="top", fontsize=MIN_FONT_PT)
    fig.subplots_adjust(hspace=0.6, wspace=0.08)
    return save(fig, path)


def wrapped_lines(text: str, width: int, most: int) -> str:
    """`text` wrapped at `width` characters onto at most `most` lines (the last one ends in … when cut)."""
    wrapped = textwrap.wrap(text, width) or [text]
    if len(wrapped) > most:
        wrapped = wrapped[: most - 1] + [textwrap.shorten(" ".join(wrapped[most - 1 :]), width, placeholder=" …")]
    return "\n".join(wrapped)


UNIT_MARGIN = 0.04  # axes on [0, 1] run from -margin to 1 + margin: a curve along 0 or 1 (AUC 1.000) stays off the frame


def roc_grid(path: Path, labels: Sequence[str], targets: np.ndarray, scores: np.ndarray, known: np.ndarray, aucs: dict, columns: int = 4) -> Path:
    return save(roc_figure(labels, targets, scores, known, aucs, columns), path)


def roc_figure(labels: Sequence[str], targets: np.ndarray, scores: np.ndarray, known: np.ndarray, aucs: dict, columns: int = 4) -> Figure:
    """One ROC panel per label (ensemble probabilities); labels without both classes say so."""
    rows = math.ceil(len(labels) / columns)
    fig = Figure(figsize=(PANEL_IN * columns, 2.05 * rows))
    axes = fig.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    for j, (ax, label) in enumerate(zip(axes.flat, labels)):
        keep = known[:, j]
        y, s = targets[keep, j], scores[keep, j]
        ax.plot([0, 1], [0, 1], color="#bbb", lw=0.8, ls="--")
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, color="#1f6feb", lw=1.6, zorder=3)
            ax.fill_between(fpr, tpr, step=None, alpha=0.08, color="#1f6feb")
            auc = aucs.get(label)
            ax.text(0.97, 0.05, f"AUC {auc:.3f}\n{int(y.sum())} pos / {len(y)}", ha="right", va="bottom", fontsize=MIN_FONT_PT,
                    transform=ax.transAxes)
        else:
            ax.text(0.5, 0.5, "one class only:\nskipped", ha="center", va="center", fontsize=MIN_FONT_PT, color="#b42318", transform=ax.transAxes)
        ax.set_title(short(label, 20), fontsize=MIN_FONT_PT)
        ax.set_xlim(-UNIT_MARGIN, 1 + UNIT_MARGIN)
        ax.set_ylim(-UNIT_MARGIN, 1 + UNIT_MARGIN)
        ax.set_xticks([0, 0.5, 1], ["0", ".5", "1"])  # short labels: neighbouring panels' "1.00" and "0.00" ran together
        ax.set_yticks([0, 0.5, 1], ["0", ".5", "1"])
        ax.tick_params(labelsize=MIN_FONT_PT)
        ax.set_aspect("equal")
    fig.supxlabel("false positive rate", fontsize=MIN_FONT_PT)
    fig.supylabel("true positive rate", fontsize=MIN_FONT_PT)
    fig.subplots_adjust(hspace=0.4, wspace=0.15, left=0.08, bottom=0.06 if rows > 2 else 0.12)
    return fig


def compact(value: float) -> str:
    """A value in [-1, 1] in at most four characters (".84", "-.12", "1.00"), so a heatmap cell holds it at MIN_FONT_PT."""
    text = f"{value:.2f}"
    return text if abs(value) >= 0.995 else text.replace("0.", ".", 1)


def matrix_heatmap(path: Path, matrix: np.ndarray, row_names: Sequence[str], col_names: Sequence[str], title: str, colorbar: str,
                   diverging: bool = True, annotate: bool = False, vlim: float | None = None, xlabel: str = "", ylabel: str = "") -> Path:
    n_rows, n_cols = matrix.shape
    cell = 0.36 if n_cols > 8 else 0.6
    fig = Figure(figsize=(max(4.2, cell * n_cols + 2.4), max(3.4, cell * n_rows + 2.1)))
    ax = fig.subplots()
    finite = matrix[np.isfinite(matrix)]
    if diverging:
        limit = vlim or (float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0)
        image = ax.imshow(matrix, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -limit, limit))
    else:
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
        image = ax.imshow(matrix, cmap=cmap, vmin=float(finite.min()) if finite.size else 0, vmax=float(finite.max()) if finite.size else 1)
    ax.set_xticks(range(n_cols), [short(c, 18) for c in col_names], rotation=60, ha="right", rotation_mode="anchor", fontsize=MIN_FONT_PT)
    ax.set_yticks(range(n_rows), [short(r, 18) for r in row_names], fontsize=MIN_FONT_PT)
    if annotate:
        for i in range(n_rows):
            for j in range(n_cols):
                if np.isfinite(matrix[i, j]):
                    r, g, b, _ = image.cmap(image.norm(matrix[i, j]))
                    ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                    ax.text(j, i, compact(matrix[i, j]), ha="center", va="center", fontsize=MIN_FONT_PT, color=ink)
    ax.set_title(title, fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=MIN_FONT_PT)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=MIN_FONT_PT)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(colorbar, fontsize=MIN_FONT_PT)
    bar.ax.tick_params(labelsize=MIN_FONT_PT)
    return save(fig, path)


def coupling_heatmap(path: Path | BinaryIO, matrix: np.ndarray, labels: Sequence[str], title: str):
    """The learned coupling matrix A (row = source label, column = target), as the report and W&B show it."""
    return matrix_heatmap(path, matrix, labels, labels, title, "coupling strength",
                          xlabel="target label (logit refined)", ylabel="source label (evidence)")


def training_curves(path: Path, runs: dict[str, dict[str, list]]) -> Path:
    """runs: fold -> {"step", "loss", "lr", "eval_step", "ema_auc", "live_auc"}; loss and learning rate side by side, the
    validation AUC under them (colour = fold in all three; solid = EMA weights, dashed = live weights)."""
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(7.4, 6.2), layout="constrained")
    grid = fig.add_gridspec(2, 2)
    ax_loss, ax_lr, ax_auc = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1]), fig.add_subplot(grid[1, :])
    for i, (name, r) in enumerate(runs.items()):
        color = FOLD_COLORS[i % len(FOLD_COLORS)]
        if r["step"]:
            ax_loss.plot(r["step"], r["loss"], color=color, lw=1.2, label=name)
            ax_lr.plot(r["step"], r["lr"], color=color, lw=1.2, label=name)
        if r["eval_step"]:
            ax_auc.plot(r["eval_step"], r["ema_auc"], color=color, lw=1.6, marker="o", ms=3, label=name)
            ax_auc.plot(r["eval_step"], r["live_auc"], color=color, lw=1.0, ls="--", alpha=0.7)
    for ax, title in ((ax_loss, "training loss"), (ax_lr, "learning rate"), (ax_auc, "validation macro AUC (own held-out fold)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=MIN_FONT_PT)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=MIN_FONT_PT)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_lr.yaxis.get_offset_text().set_fontsize(MIN_FONT_PT)
    ax_loss.legend(fontsize=MIN_FONT_PT, frameon=False)
    styles = [Line2D([], [], color="#555", lw=1.6, marker="o", ms=3, label="EMA weights"),
              Line2D([], [], color="#555", lw=1.0, ls="--", label="live weights")]
    ax_auc.legend(handles=styles, fontsize=MIN_FONT_PT, frameon=False, loc="lower right")
    return save(fig, path)
