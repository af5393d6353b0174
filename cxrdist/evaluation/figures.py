"""The report's figures: matplotlib (Agg, object-oriented API: no pyplot state), one PNG each."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

import matplotlib
import numpy as np
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

DPI = 110
FOLD_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
PALETTE = {"train": "#3b6ea8", "uncertain": "#a9c4e4", "test": "#d1495b"}


def save(fig: Figure, path: Path | BinaryIO) -> Path | BinaryIO:
    """A PNG at `path`, or into a binary file object."""
    if isinstance(path, Path):
        path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return path


def short(label: str, width: int = 14) -> str:
    """Label names wrapped onto lines of ~width characters for axes."""
    return "\n".join(textwrap.wrap(label, width)) or label


def label_frequency(path: Path, labels: Sequence[str], train_pos: np.ndarray, train_unc: np.ndarray, train_n: int,
                    test_prev: np.ndarray | None) -> Path:
    """Horizontal bars: positive and uncertain prevalence over the training folds; test prevalence as dots."""
    order = np.argsort(train_pos)
    y = np.arange(len(labels))
    fig = Figure(figsize=(8.5, 0.36 * len(labels) + 1.4))
    ax = fig.subplots()
    pos, unc = 100 * train_pos[order] / max(train_n, 1), 100 * train_unc[order] / max(train_n, 1)
    ax.barh(y, pos, color=PALETTE["train"], label="positive (training folds)")
    ax.barh(y, unc, left=pos, color=PALETTE["uncertain"], label="uncertain (training folds)")
    if test_prev is not None:
        ax.scatter(100 * test_prev[order], y, color=PALETTE["test"], zorder=3, s=22, label="positive (test split)")
    right = pos + unc if test_prev is None else np.maximum(pos + unc, 100 * test_prev[order])
    for yi, p, r in zip(y, pos, right):
        ax.text(r + 0.8, yi, f"{p:.1f}%", va="center", fontsize=8, color="#333")
    ax.set_yticks(y, [labels[i] for i in order], fontsize=9)
    ax.set_xlabel("images (%)")
    ax.set_xlim(0, max(10.0, float((pos + unc).max()) * 1.15))
    ax.grid(axis="x", alpha=0.3)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="lower right", fontsize=8, frameon=False)
    return save(fig, path)


def image_grid(count: int, columns: int, cell: tuple[float, float]):
    """A figure of `count` image cells, `columns` per row, axes off; returns (figure, the flat axes)."""
    rows = max(1, math.ceil(count / columns))
    fig = Figure(figsize=(cell[0] * columns, cell[1] * rows))
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    return fig, axes.flat


def sample_grid(path: Path, images: Sequence[np.ndarray], captions: Sequence[str], titles: Sequence[str], columns: int = 6) -> Path:
    fig, axes = image_grid(len(images), columns, (2.3, 2.75))
    for ax, image, caption, title in zip(axes, images, captions, titles):
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set_title(title, fontsize=7.5, color="#555")
        ax.text(0.5, -0.03, caption, transform=ax.transAxes, ha="center", va="top", fontsize=7.5, wrap=True)
    fig.subplots_adjust(hspace=0.55, wspace=0.08)
    return save(fig, path)


def roc_grid(path: Path, labels: Sequence[str], targets: np.ndarray, scores: np.ndarray, known: np.ndarray, aucs: dict, columns: int = 5) -> Path:
    """One ROC panel per label (ensemble probabilities); labels without both classes say so."""
    rows = math.ceil(len(labels) / columns)
    fig = Figure(figsize=(2.7 * columns, 2.75 * rows))
    axes = fig.subplots(rows, columns, squeeze=False, sharex=True, sharey=True)
    for ax in axes.flat[len(labels):]:
        ax.axis("off")
    for j, (ax, label) in enumerate(zip(axes.flat, labels)):
        keep = known[:, j]
        y, s = targets[keep, j], scores[keep, j]
        ax.plot([0, 1], [0, 1], color="#bbb", lw=0.8, ls="--")
        if len(np.unique(y)) == 2:
            fpr, tpr, _ = roc_curve(y, s)
            ax.plot(fpr, tpr, color="#1f6feb", lw=1.6)
            ax.fill_between(fpr, tpr, step=None, alpha=0.08, color="#1f6feb")
            auc = aucs.get(label)
            ax.text(0.97, 0.05, f"AUC {auc:.3f}\n{int(y.sum())} pos / {len(y)}", ha="right", va="bottom", fontsize=8, transform=ax.transAxes)
        else:
            ax.text(0.5, 0.5, "one class only:\nskipped", ha="center", va="center", fontsize=8, color="#b42318", transform=ax.transAxes)
        ax.set_title(short(label, 24), fontsize=9)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.01)
        ax.set_xticks([0, 0.5, 1], ["0", "0.5", "1"])  # short labels: neighbouring panels' "1.00" and "0.00" ran together
        ax.set_yticks([0, 0.5, 1], ["0", "0.5", "1"])
        ax.set_aspect("equal")
    for ax in axes[-1]:
        ax.set_xlabel("false positive rate", fontsize=8)
    for ax in axes[:, 0]:
        ax.set_ylabel("true positive rate", fontsize=8)
    fig.subplots_adjust(hspace=0.45, wspace=0.2)
    return save(fig, path)


def matrix_heatmap(path: Path, matrix: np.ndarray, row_names: Sequence[str], col_names: Sequence[str], title: str, colorbar: str,
                   diverging: bool = True, annotate: bool = False, vlim: float | None = None, xlabel: str = "", ylabel: str = "") -> Path:
    n_rows, n_cols = matrix.shape
    size = max(4.2, 0.42 * n_cols + 2.6)
    fig = Figure(figsize=(size, max(3.4, 0.42 * n_rows + 2.2)))
    ax = fig.subplots()
    finite = matrix[np.isfinite(matrix)]
    if diverging:
        limit = vlim or (float(np.abs(finite).max()) if finite.size and np.abs(finite).max() > 0 else 1.0)
        image = ax.imshow(matrix, cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -limit, limit))
    else:
        cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#eeeeee")
        image = ax.imshow(matrix, cmap=cmap, vmin=float(finite.min()) if finite.size else 0, vmax=float(finite.max()) if finite.size else 1)
    ax.set_xticks(range(n_cols), [short(c, 18) for c in col_names], rotation=60, ha="right", fontsize=8)
    ax.set_yticks(range(n_rows), [short(r, 26) for r in row_names], fontsize=8)
    if annotate:
        for i in range(n_rows):
            for j in range(n_cols):
                if np.isfinite(matrix[i, j]):
                    r, g, b, _ = image.cmap(image.norm(matrix[i, j]))
                    ink = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7.5, color=ink)
    ax.set_title(title, fontsize=10)
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=9)
    if ylabel:
        ax.set_ylabel(ylabel, fontsize=9)
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(colorbar, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    return save(fig, path)


def coupling_heatmap(path: Path | BinaryIO, matrix: np.ndarray, labels: Sequence[str], title: str):
    """The learned coupling matrix A (row = source label, column = target), as the report and W&B show it."""
    return matrix_heatmap(path, matrix, labels, labels, title, "coupling strength",
                          xlabel="target label (logit refined)", ylabel="source label (evidence)")


def training_curves(path: Path, runs: dict[str, dict[str, list]]) -> Path:
    """runs: fold -> {"step", "loss", "lr", "eval_step", "ema_auc", "live_auc"}; three panels side by side."""
    fig = Figure(figsize=(14, 3.9))
    ax_loss, ax_lr, ax_auc = fig.subplots(1, 3)
    for i, (name, r) in enumerate(runs.items()):
        color = FOLD_COLORS[i % len(FOLD_COLORS)]
        if r["step"]:
            ax_loss.plot(r["step"], r["loss"], color=color, lw=1.2, label=name)
            ax_lr.plot(r["step"], r["lr"], color=color, lw=1.2, label=name)
        if r["eval_step"]:
            ax_auc.plot(r["eval_step"], r["ema_auc"], color=color, lw=1.6, marker="o", ms=3, label=f"{name} EMA")
            ax_auc.plot(r["eval_step"], r["live_auc"], color=color, lw=1.0, ls="--", alpha=0.7, label=f"{name} live")
    for ax, title in ((ax_loss, "training loss"), (ax_lr, "learning rate"), (ax_auc, "validation macro AUC (own held-out fold)")):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("optimizer step", fontsize=9)
        ax.grid(alpha=0.3)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=8)
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    ax_loss.legend(fontsize=8, frameon=False)
    ax_auc.legend(fontsize=7, frameon=False, ncol=2)
    fig.subplots_adjust(wspace=0.25)
    return save(fig, path)
