"""Figures that training runs and sweeps log to MLflow, drawn with matplotlib's Agg backend."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from skimage.segmentation import find_boundaries  # noqa: E402

from ccflow.explain import render_overlay  # noqa: E402

TRUE_OUTLINE_RGB = (0, 255, 255)
"""Colour of the true cell outlines in validation overlays (cyan); predicted outlines
use the colour of :func:`ccflow.explain.render_overlay`."""


def training_curves(history: Mapping[str, Sequence[tuple[int, float]]]) -> plt.Figure:
    """Plot losses and validation detection F1 per epoch.

    Parameters
    ----------
    history : mapping of str to sequence of (epoch, value)
        Metric histories, such as ``{"train_loss": [(0, 0.7), (1, 0.5)], ...}``. Keys
        ending in ``_loss`` go to the left panel, the others to the right one.
    """
    figure, (loss_axis, score_axis) = plt.subplots(1, 2, figsize=(10, 4))
    for name, points in sorted(history.items()):
        if not points:
            continue
        steps, values = zip(*sorted(points))
        axis = loss_axis if name.endswith("_loss") else score_axis
        axis.plot(steps, values, marker="o", label=name)
    loss_axis.set(xlabel="epoch", ylabel="loss", title="Losses")
    score_axis.set(xlabel="epoch", ylabel="score", title="Validation", ylim=(0, 1))
    for axis in (loss_axis, score_axis):
        axis.grid(alpha=0.3)
        if axis.lines:
            axis.legend()
    figure.tight_layout()
    return figure


def validation_overlay(image: np.ndarray, true_mask: np.ndarray, predicted_labels: np.ndarray) -> np.ndarray:
    """Draw predicted cell outlines and true cell outlines over an image.

    Parameters
    ----------
    image : numpy.ndarray
        float (H, W, 3) in [0, 1].
    true_mask : numpy.ndarray
        bool (H, W), True for cell pixels.
    predicted_labels : numpy.ndarray
        Integer label image (H, W), 0 = background.

    Returns
    -------
    numpy.ndarray
        uint8 RGB (H, W, 3); true outlines are :data:`TRUE_OUTLINE_RGB`.
    """
    overlay = render_overlay(image, predicted_labels)
    overlay[find_boundaries(np.asarray(true_mask, dtype=bool), mode="inner")] = TRUE_OUTLINE_RGB
    return overlay


def lr_range_plot(lrs: Sequence[float], losses: Sequence[float], chosen: float) -> plt.Figure:
    """Plot the smoothed loss against the learning rate, on a log axis, with the chosen rate."""
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot(lrs, losses)
    axis.axvline(chosen, color="tab:red", linestyle="--", label=f"chosen lr {chosen:.2e}")
    axis.set(xscale="log", xlabel="learning rate", ylabel="smoothed training loss",
             title="Learning-rate range test")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def metrics_by_loss(runs: pd.DataFrame, metrics: Sequence[str]) -> plt.Figure:
    """Show each metric's values per loss function, one point per run, with the mean."""
    losses = sorted(runs["loss"].unique())
    figure, axes = plt.subplots(1, len(metrics), figsize=(3.2 * len(metrics), 3.6), squeeze=False)
    for axis, metric in zip(axes[0], metrics):
        for position, loss in enumerate(losses):
            values = runs.loc[runs["loss"] == loss, metric].astype(float).to_numpy()
            axis.scatter(np.full(len(values), position), values, alpha=0.7)
            if len(values):
                axis.hlines(np.nanmean(values), position - 0.25, position + 0.25, color="black")
        axis.set_xticks(range(len(losses)), losses)
        axis.set_xlim(-0.6, len(losses) - 0.4)
        axis.set_title(metric)
        axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    return figure


def predicted_vs_true_counts(counts: pd.DataFrame) -> plt.Figure:
    """Scatter predicted against true cell counts per image, coloured by loss.

    ``counts`` has the columns ``loss``, ``true_count`` and ``pred_count``.
    """
    figure, axis = plt.subplots(figsize=(5, 5))
    for loss, rows in counts.groupby("loss"):
        axis.scatter(rows["true_count"], rows["pred_count"], alpha=0.7, label=loss)
    upper = float(max(counts["true_count"].max(), counts["pred_count"].max(), 1)) * 1.05
    axis.plot([0, upper], [0, upper], color="gray", linestyle="--", label="predicted = true")
    axis.set(xlabel="true count", ylabel="predicted count", xlim=(0, upper), ylim=(0, upper),
             title="Cell counts per image")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    return figure


def table_figure(table: pd.DataFrame, title: str) -> plt.Figure:
    """Render a small table of strings as a figure, for a PNG next to the CSV."""
    figure, axis = plt.subplots(figsize=(max(6, 1.6 * len(table.columns)), 0.5 + 0.4 * (len(table) + 1)))
    axis.axis("off")
    cells = axis.table(cellText=table.to_numpy(), colLabels=list(table.columns), loc="center")
    cells.auto_set_font_size(False)
    cells.set_fontsize(8)
    axis.set_title(title)
    figure.tight_layout()
    return figure
