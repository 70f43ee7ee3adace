"""Summarise the drift and count trend of recent counting runs from MLflow.

Counting runs are read from an MLflow experiment (by default ``ccflow-counting``) with the
metrics ``drift_overall``, ``cells`` (or ``cells_total``) and ``images_counted`` and the tag
``drift_flagged`` that counting jobs log (see :func:`ccflow.drift.log_drift`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)

COUNTING_EXPERIMENT = "ccflow-counting"
TREND_COLUMNS = [
    "start_time",
    "run_id",
    "status",
    "images_counted",
    "cells",
    "cells_per_image",
    "drift_overall",
    "drift_flagged",
]


def recent_counting_runs(experiment: str = COUNTING_EXPERIMENT, limit: int = 20, client=None) -> pd.DataFrame:
    """Return the latest counting runs, newest first, with their counts and drift.

    Parameters
    ----------
    experiment : str
        MLflow experiment of the counting runs.
    limit : int
        Maximum number of runs, at least 1.
    client : mlflow.MlflowClient, optional

    Returns
    -------
    pandas.DataFrame
        Columns :data:`TREND_COLUMNS`; ``start_time`` is a UTC timestamp, missing metrics
        are NaN and ``drift_flagged`` is True, False or None (no drift logged).

    Raises
    ------
    ValueError
        If the experiment does not exist or ``limit`` is below 1.
    """
    import mlflow

    if limit < 1:
        raise ValueError(f"limit must be at least 1 run, got {limit}.")
    client = client or mlflow.MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ValueError(
            f"MLflow experiment {experiment!r} not found at {mlflow.get_tracking_uri()}. "
            f"Check the experiment name and MLFLOW_TRACKING_URI."
        )
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], max_results=limit)

    rows = []
    for run in runs:
        metrics = run.data.metrics
        flag = run.data.tags.get("drift_flagged")
        images = metrics.get("images_counted", np.nan)
        # The Ray Data counting job logs "cells"; "cells_total" is accepted as an alternative.
        cells = metrics.get("cells", metrics.get("cells_total", np.nan))
        rows.append(
            {
                "start_time": pd.Timestamp(run.info.start_time, unit="ms", tz="UTC"),
                "run_id": run.info.run_id,
                "status": run.info.status,
                "images_counted": images,
                "cells": cells,
                "cells_per_image": cells / images if images else np.nan,
                "drift_overall": metrics.get("drift_overall", np.nan),
                "drift_flagged": None if flag is None else flag == "true",
            }
        )
    return pd.DataFrame(rows, columns=TREND_COLUMNS)


def format_trend(runs: pd.DataFrame) -> str:
    """Return the runs as a text table, oldest first, for the terminal."""
    if runs.empty:
        return "No counting runs found."
    table = runs.iloc[::-1].copy()
    table["start_time"] = table["start_time"].dt.strftime("%Y-%m-%d %H:%M")
    table["run_id"] = table["run_id"].str[:8]
    table["drift_flagged"] = table["drift_flagged"].map({True: "FLAGGED", False: "ok"}).fillna("-")
    return table.to_string(index=False, float_format=lambda value: f"{value:.3f}", na_rep="-")


def plot_trend(runs: pd.DataFrame, path: Path, threshold: float | None = None) -> Path:
    """Plot drift and cells per image of the runs over time into a PNG file.

    Parameters
    ----------
    runs : pandas.DataFrame
        As :func:`recent_counting_runs` returns it.
    path : pathlib.Path
        Output PNG file; its folder is created if missing.
    threshold : float, optional
        Drift threshold drawn as a horizontal line.

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = runs.sort_values("start_time")
    figure, (drift_axis, count_axis) = plt.subplots(2, 1, sharex=True, figsize=(8, 6))
    drift_axis.plot(ordered["start_time"], ordered["drift_overall"], marker="o")
    flagged = ordered[ordered["drift_flagged"] == True]  # noqa: E712 (None must not match)
    drift_axis.scatter(flagged["start_time"], flagged["drift_overall"], color="red", zorder=3, label="flagged")
    if threshold is not None:
        drift_axis.axhline(threshold, color="grey", linestyle="--", label=f"threshold {threshold:g}")
    drift_axis.set_ylabel("overall drift (PSI)")
    drift_axis.legend(loc="upper left")
    count_axis.plot(ordered["start_time"], ordered["cells_per_image"], marker="o", color="tab:green")
    count_axis.set_ylabel("cells per image")
    count_axis.set_xlabel("run start (UTC)")
    figure.autofmt_xdate()
    figure.tight_layout()

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    logger.info("Wrote the trend plot of %d runs to %s", len(runs), path)
    return path
