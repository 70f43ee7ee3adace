"""CodeCarbon offline tracking and its MLflow logging."""

import time

import mlflow
import pytest

from ccflow.energy import log_energy, track_energy

pytestmark = pytest.mark.timeout(120)


def test_track_energy_reports_parts(tmp_path):
    with track_energy("unit", tmp_path, "FRA", measure_power_secs=1) as tracking:
        time.sleep(1.2)
    report = tracking.report

    assert report.country_iso_code == "FRA"
    assert report.duration_s >= 1.0
    assert report.energy_kwh > 0
    assert report.energy_kwh == pytest.approx(report.cpu_kwh + report.gpu_kwh + report.ram_kwh, rel=1e-6)
    assert report.emissions_csv == tmp_path / "emissions.csv"


def test_track_energy_rejects_bad_country(tmp_path):
    with pytest.raises(ValueError, match="Invalid country code 'IT'"):
        with track_energy("unit", tmp_path, "IT"):
            pass


def test_log_energy_with_prefix(tmp_path, mlflow_backend):
    with track_energy("unit", tmp_path, measure_power_secs=1) as tracking:
        time.sleep(0.5)
    mlflow.set_experiment("ccflow-tests")
    with mlflow.start_run() as run:
        log_energy(tracking.report, prefix="count_")
    logged = mlflow.MlflowClient().get_run(run.info.run_id)

    assert logged.data.metrics["count_energy_kwh"] == pytest.approx(tracking.report.energy_kwh)
    assert logged.data.metrics["count_co2_kg"] == pytest.approx(tracking.report.emissions_kg)
    assert logged.data.tags["count_energy_country"] == "ITA"
    assert [a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "energy")] == ["energy/emissions.csv"]
