"""A tiny loss sweep (2 losses x 2 seeds) on the FNC sample: child runs and parent summary."""

import mlflow
import pandas as pd
import pytest

from ccflow.sweep import SUMMARY_METRICS, parse_losses, run_sweep
from ccflow.train import TrainConfig
from tests.conftest import TINY_TRAINING

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def sweep(fnc_sample_dir, mlflow_backend, ray_cluster):
    settings = {**TINY_TRAINING, "epochs": 1, "samples_per_epoch": 4}
    base = TrainConfig(data=fnc_sample_dir, register=False, overlays=0, system_metrics=False, **settings)
    return run_sweep(base, ["dice", "focal"], seeds=2)


def test_parent_has_four_children(sweep):
    parent = mlflow.get_run(sweep.parent_run_id)
    children = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{sweep.parent_run_id}'",
    )

    assert len(children) == 4
    assert sorted(zip(children["params.loss"], children["params.seed"])) == [
        ("dice", "0"), ("dice", "1"), ("focal", "0"), ("focal", "1"),
    ]


def test_summary_equals_child_metrics(sweep):
    client = mlflow.MlflowClient()
    path = mlflow.artifacts.download_artifacts(f"runs:/{sweep.parent_run_id}/sweep/summary.csv")
    summary = pd.read_csv(path).set_index("loss")

    for loss in ("dice", "focal"):
        run_ids = sweep.runs.loc[sweep.runs["loss"] == loss, "run_id"]
        children = [client.get_run(run_id).data.metrics for run_id in run_ids]
        for name in SUMMARY_METRICS:
            key = f"eval_{name}" if name in ("seg_f1", "det_f1", "count_mae", "count_mape") else name
            values = pd.Series([child[key] for child in children])
            assert summary.loc[loss, f"{name}_mean"] == pytest.approx(values.mean()), (loss, name)
            assert summary.loc[loss, f"{name}_std"] == pytest.approx(values.std(ddof=1), nan_ok=True), (loss, name)
        assert summary.loc[loss, "n_runs"] == 2


def test_parent_logs_tables_and_plots(sweep):
    client = mlflow.MlflowClient()
    artifacts = {a.path for a in client.list_artifacts(sweep.parent_run_id, "sweep")}
    metrics = client.get_run(sweep.parent_run_id).data.metrics

    assert {
        "sweep/summary.csv", "sweep/summary.md", "sweep/summary.html", "sweep/summary.png",
        "sweep/runs.csv", "sweep/metrics_by_loss.png", "sweep/pred_vs_true_counts.png",
    } <= artifacts
    assert metrics["total_co2_kg"] == pytest.approx(sweep.runs["co2_kg"].sum())
    assert metrics["dice_det_f1_mean"] == pytest.approx(sweep.summary.set_index("loss").loc["dice", "det_f1_mean"])


def test_parse_losses_rejects_unknown():
    with pytest.raises(ValueError, match="l2"):
        parse_losses("dice,l2")
