"""`mlflow run` of the project's MLproject, as a user starts it, on the real FNC sample."""

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from ccflow import REGISTERED_MODEL_NAME
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow


def test_mlflow_run_trains_and_registers(fnc_sample_dir, tmp_path, mlflow_backend):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # mlflow.set_experiment, set_tracking_uri and set_registry_uri export MLFLOW_*
    # variables naming the session's backend; the run must see only its own.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env = {
        **inherited,
        "MLFLOW_TRACKING_URI": uri,
        # `mlflow run --env-manager local` runs `python` from PATH: this interpreter.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    command = [
        sys.executable, "-m", "mlflow", "run", str(REPO_ROOT), "--env-manager", "local",
        "-P", "loss=dice", "-P", f"data={fnc_sample_dir}", "-P", "base_width=4",
        "-P", "epochs=1", "-P", "crop_size=256", "-P", "batch_size=4",
        "-P", "samples_per_epoch=4",
    ]

    completed = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )

    assert completed.returncode == 0, completed.stderr[-4000:]
    client = mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    versions = client.search_model_versions(f"name='{REGISTERED_MODEL_NAME}'")
    assert len(versions) == 1
    run = client.get_run(versions[0].run_id)
    assert run.data.params["loss"] == "dice"
    assert run.info.status == "FINISHED"
    assert "eval_det_f1" in run.data.metrics
