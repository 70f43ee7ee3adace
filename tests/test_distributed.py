"""Two Ray Train workers on the real FNC sample: sharded crops, energy, system metrics, plots."""

import mlflow
import pytest

from ccflow.train import TrainConfig, train
from tests.conftest import TINY_TRAINING

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def two_worker_run(fnc_sample_dir, mlflow_backend, ray_cluster, tmp_path_factory):
    # One system-metrics sample per second, so even a short run records some.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")
        settings = {**TINY_TRAINING, "epochs": 1, "samples_per_epoch": 8}
        return train(
            TrainConfig(
                data=fnc_sample_dir,
                test_data=fnc_sample_dir,
                workers=2,
                use_gpu="auto",
                register=False,
                overlays=1,
                storage_path=str(tmp_path_factory.mktemp("checkpoints")),
                **settings,
            )
        )


def test_workers_share_crops(two_worker_run):
    client = mlflow.MlflowClient()
    run = client.get_run(two_worker_run.run_id)

    assert run.data.params["workers"] == "2"
    assert run.data.params["effective_batch_size"] == "8"
    assert run.data.metrics["effective_batch_size"] == 8
    # 8 crops per epoch split over two workers by the distributed sampler.
    assert run.data.metrics["train_crops_worker_0"] == 4
    assert run.data.metrics["train_crops_worker_1"] == 4
    assert run.data.metrics["effective_lr"] == pytest.approx(1e-3)


def test_energy_logged_once(two_worker_run):
    client = mlflow.MlflowClient()
    run = client.get_run(two_worker_run.run_id)
    energy = [a.path for a in client.list_artifacts(two_worker_run.run_id, "energy")]

    for key in ("co2_kg", "energy_kwh", "cpu_energy_kwh", "ram_energy_kwh", "gpu_energy_kwh"):
        assert run.data.metrics[key] >= 0, key
    assert run.data.metrics["energy_kwh"] > 0
    assert run.data.metrics["energy_kwh"] == pytest.approx(
        run.data.metrics["cpu_energy_kwh"]
        + run.data.metrics["gpu_energy_kwh"]
        + run.data.metrics["ram_energy_kwh"],
        rel=1e-6,
    )
    assert run.data.tags["energy_country"] == "ITA"
    assert energy == ["energy/emissions.csv"]
    # One tracker on the driver writes one row for the whole run.
    rows = mlflow.artifacts.load_text(f"runs:/{two_worker_run.run_id}/energy/emissions.csv")
    assert len(rows.strip().splitlines()) == 2


def test_system_metrics_recorded(two_worker_run):
    metrics = mlflow.MlflowClient().get_run(two_worker_run.run_id).data.metrics

    assert "system/cpu_utilization_percentage" in metrics
    assert "system/system_memory_usage_megabytes" in metrics


def test_test_split_logged_apart(two_worker_run):
    metrics = mlflow.MlflowClient().get_run(two_worker_run.run_id).data.metrics

    assert metrics["test_n_images"] == 4
    assert metrics["test_true_count"] == 58
    assert metrics["eval_n_images"] == 1
    assert 0.0 <= metrics["test_det_f1"] <= 1.0


def test_plots_and_overlays_logged(two_worker_run):
    client = mlflow.MlflowClient()
    plots = [a.path for a in client.list_artifacts(two_worker_run.run_id, "plots")]
    overlays = [a.path for a in client.list_artifacts(two_worker_run.run_id, "overlays/val")]

    assert plots == ["plots/training_curves.png"]
    assert len(overlays) == 1
    assert overlays[0].endswith(".png")
