"""Loss-function study: train every loss with every seed as child runs of one parent run.

The parent run gets ``sweep/runs.csv`` (one row per child run), ``sweep/summary.csv``
with the mean and standard deviation per loss, the same table as Markdown, HTML and
PNG, and comparison plots. Children are trained one after another in this process,
each with its own energy tracker, so no two trackers overlap.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from ccflow.losses import LOSSES
from ccflow.train import TrainConfig, train

logger = logging.getLogger(__name__)

SUMMARY_METRICS = {
    "seg_f1": "segmentation F1",
    "det_f1": "detection F1",
    "count_mae": "count MAE",
    "count_mape": "count MAPE (%)",
    "train_minutes": "training time (min)",
    "energy_kwh": "energy (kWh)",
    "co2_kg": "CO2 (kg)",
}
"""Columns of the summary, keyed by the name used in ``sweep/runs.csv``."""

SCORE_METRICS = ("seg_f1", "det_f1", "count_mae", "count_mape")


@dataclass
class SweepResult:
    """The parent run id, one row per child run and the per-loss summary."""

    parent_run_id: str
    runs: pd.DataFrame
    summary: pd.DataFrame


def parse_losses(value: str) -> list[str]:
    """Split a comma-separated list of loss names and check each one."""
    losses = [name.strip() for name in value.split(",") if name.strip()]
    if not losses:
        raise ValueError(f"Invalid losses {value!r}: give at least one, such as 'dice,focal'.")
    unknown = [name for name in losses if name not in LOSSES]
    if unknown:
        raise ValueError(f"Invalid losses {unknown}: choose from {', '.join(LOSSES)}.")
    if len(set(losses)) != len(losses):
        raise ValueError(f"Invalid losses {value!r}: each loss may appear only once.")
    return losses


def run_sweep(base: TrainConfig, losses: list[str], seeds: int) -> SweepResult:
    """Train each loss with seeds 0..seeds-1 as child runs and summarise them in the parent run.

    Parameters
    ----------
    base : TrainConfig
        Settings shared by all child runs; ``loss`` and ``seed`` are replaced per child.
    losses : list of str
        Loss names, see :data:`ccflow.losses.LOSSES`.
    seeds : int
        Number of seeds per loss. The seed fixes the data split, the crops and the
        initial weights, so runs with the same seed differ only in the loss.

    Returns
    -------
    SweepResult

    Notes
    -----
    Scores come from the test split (``test_*`` metrics) when ``base.test_data`` is set,
    else from the validation images (``eval_*``). The standard deviation is the sample
    standard deviation (ddof=1); it is NaN with one seed.
    """
    if seeds < 1:
        raise ValueError(f"Invalid seeds={seeds}: use 1 or more.")
    prefix = "test_" if base.test_data else "eval_"
    if mlflow.active_run() is None and not _inside_mlflow_run():
        mlflow.set_experiment(base.experiment)

    # Inside `mlflow run` the parent is the run that `mlflow run` created and named.
    run_name = None if _inside_mlflow_run() else "loss-sweep"
    with mlflow.start_run(run_name=run_name) as parent:
        params = {
            "losses": ",".join(losses),
            "seeds": seeds,
            "score_split": prefix.rstrip("_"),
            **{f"base_{k}": v for k, v in base.to_params().items() if k not in ("loss", "seed", "run_name")},
        }
        # `mlflow run` has logged its own parameters already, as the user typed them.
        already_logged = mlflow.get_run(parent.info.run_id).data.params
        mlflow.log_params({k: v for k, v in params.items() if k not in already_logged})
        mlflow.set_tag("ccflow.sweep", "parent")
        rows, counts = [], []
        for loss in losses:
            for seed in range(seeds):
                config = replace(base, loss=loss, seed=seed, run_name=f"{loss}-seed{seed}")
                logger.info("Sweep: training %s with seed %d", loss, seed)
                result = train(config)
                rows.append(_child_row(result.run_id, loss, seed, prefix))
                per_image = result.per_image if not base.test_data else _test_counts(result.run_id)
                counts.append(per_image.assign(loss=loss, seed=seed))
        runs = pd.DataFrame(rows)
        summary = summarise(runs)
        _log_summary(parent.info.run_id, runs, summary, pd.concat(counts, ignore_index=True))
    logger.info("Sweep finished: parent run %s with %d child runs", parent.info.run_id, len(runs))
    return SweepResult(parent.info.run_id, runs, summary)


def _inside_mlflow_run() -> bool:
    import os

    return "MLFLOW_RUN_ID" in os.environ


def _child_row(run_id: str, loss: str, seed: int, prefix: str) -> dict:
    metrics = mlflow.get_run(run_id).data.metrics
    row = {"run_id": run_id, "loss": loss, "seed": seed}
    for name in SUMMARY_METRICS:
        key = f"{prefix}{name}" if name in SCORE_METRICS else name
        row[name] = metrics.get(key, np.nan)
    return row


def _test_counts(run_id: str) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(f"runs:/{run_id}/evaluation/test_per_image.csv")
    return pd.read_csv(path)


def summarise(runs: pd.DataFrame) -> pd.DataFrame:
    """Return the mean and sample standard deviation of each summary metric per loss.

    The result has one row per loss, the column ``n_runs`` and the columns
    ``<metric>_mean`` and ``<metric>_std`` for each key of :data:`SUMMARY_METRICS`.
    """
    grouped = runs.groupby("loss", sort=True)
    summary = pd.DataFrame({"n_runs": grouped.size()})
    for name in SUMMARY_METRICS:
        summary[f"{name}_mean"] = grouped[name].mean()
        summary[f"{name}_std"] = grouped[name].std(ddof=1)
    return summary.reset_index()


def render_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Format the summary as strings "mean ± std", one column per metric, for reading."""
    table = pd.DataFrame({"loss": summary["loss"], "runs": summary["n_runs"].astype(int)})
    for name, label in SUMMARY_METRICS.items():
        digits = 6 if name in ("energy_kwh", "co2_kg") else 3
        table[label] = [
            f"{mean:.{digits}g} ± {std:.{digits}g}" if np.isfinite(std) else f"{mean:.{digits}g}"
            for mean, std in zip(summary[f"{name}_mean"], summary[f"{name}_std"])
        ]
    return table


def markdown_table(table: pd.DataFrame) -> str:
    """Return a table of strings as a GitHub-flavoured Markdown table."""
    lines = [
        "| " + " | ".join(str(c) for c in table.columns) + " |",
        "|" + "|".join("---" for _ in table.columns) + "|",
    ]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _log_summary(parent_run_id: str, runs: pd.DataFrame, summary: pd.DataFrame, counts: pd.DataFrame) -> None:
    import matplotlib.pyplot as plt

    from ccflow.plots import metrics_by_loss, predicted_vs_true_counts, table_figure

    table = render_table(summary)
    with tempfile.TemporaryDirectory() as directory:
        folder = Path(directory)
        runs.to_csv(folder / "runs.csv", index=False)
        summary.to_csv(folder / "summary.csv", index=False)
        counts.to_csv(folder / "counts.csv", index=False)
        (folder / "summary.md").write_text(markdown_table(table))
        (folder / "summary.html").write_text(table.to_html(index=False))
        mlflow.log_artifacts(directory, artifact_path="sweep")

    figures = {
        "sweep/summary.png": table_figure(table, "Loss-function sweep: mean ± std over seeds"),
        "sweep/metrics_by_loss.png": metrics_by_loss(runs, list(SUMMARY_METRICS)),
        "sweep/pred_vs_true_counts.png": predicted_vs_true_counts(counts),
    }
    for artifact_file, figure in figures.items():
        mlflow.log_figure(figure, artifact_file)
        plt.close(figure)

    # The per-loss means as parent metrics make sweeps comparable in the MLflow UI.
    metrics = {}
    for row in summary.itertuples(index=False):
        for name in SUMMARY_METRICS:
            value = getattr(row, f"{name}_mean")
            if np.isfinite(value):
                metrics[f"{row.loss}_{name}_mean"] = float(value)
    metrics["total_energy_kwh"] = float(runs["energy_kwh"].sum())
    metrics["total_co2_kg"] = float(runs["co2_kg"].sum())
    mlflow.log_metrics(metrics)
