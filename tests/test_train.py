"""End-to-end training on the real FNC sample: Ray Train, MLflow run, registered version."""

import json

import mlflow
import pytest

from ccflow import REGISTERED_MODEL_NAME
from ccflow.postprocess import PostprocessConfig
from ccflow.train import TrainConfig
from ccflow.train_loop import cosine_lr, training_progress

pytestmark = pytest.mark.slow


def test_training_registers_version(trained_fnc_model):
    client = mlflow.MlflowClient()
    version = client.get_model_version(REGISTERED_MODEL_NAME, trained_fnc_model.model_version)

    assert version.run_id == trained_fnc_model.run_id
    assert len(version.tags["data_fingerprint"]) == 64
    assert "eval_det_f1" in version.tags
    assert "c-resunet" in version.description


def test_training_logs_params_and_history(trained_fnc_model):
    client = mlflow.MlflowClient()
    run = client.get_run(trained_fnc_model.run_id)

    assert run.data.params["loss"] == "focal"
    assert run.data.params["n_train_images"] == "3"
    assert run.data.params["n_val_images"] == "1"
    for key in ("train_loss", "val_loss", "val_det_f1", "lr"):
        history = client.get_metric_history(run.info.run_id, key)
        assert [m.step for m in history] == [0, 1], key
    assert run.data.params["lr_schedule"] == "plateau"
    assert "eval_count_mape" in run.data.metrics
    assert 0.0 <= run.data.metrics["eval_det_f1"] <= 1.0


def test_training_logs_split_and_artifacts(trained_fnc_model):
    run_id = trained_fnc_model.run_id
    split = mlflow.artifacts.load_dict(f"runs:/{run_id}/data_split.json")
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run_id)}

    assert len(split["train"]) == 3
    assert len(split["validation"]) == 1
    assert not set(split["train"]) & set(split["validation"])
    assert "checkpoints" in artifacts
    assert "evaluation" in artifacts


def test_model_config_stores_auto_threshold(trained_fnc_model):
    model = mlflow.pyfunc.load_model(trained_fnc_model.model_uri)
    config = model.model_config

    assert config["postprocess"]["threshold"] == pytest.approx(trained_fnc_model.threshold)
    assert config["arch"] == "c-resunet"
    assert config["scale"] == 0.5
    run = mlflow.MlflowClient().get_run(trained_fnc_model.run_id)
    assert float(run.data.params["threshold_chosen"]) == trained_fnc_model.threshold


def test_config_rejects_unknown_loss():
    with pytest.raises(ValueError, match="Invalid loss 'l2'"):
        TrainConfig(loss="l2").validate()


def test_config_rejects_bad_threshold():
    with pytest.raises(ValueError, match="threshold"):
        TrainConfig(threshold=1.5).validate()


def test_params_are_flat():
    params = TrainConfig(postprocess=PostprocessConfig(min_size_px=150)).to_params()

    assert params["data"] == "synthetic"
    assert params["postprocess_min_size_px"] == 150
    assert all(not isinstance(v, dict) for v in params.values())
    json.dumps(params)


def test_config_rejects_unknown_schedule():
    with pytest.raises(ValueError, match="Invalid lr_schedule='step'"):
        TrainConfig(lr_schedule="step").validate()


@pytest.mark.parametrize(
    ("progress", "expected"),
    [(0.0, 1e-3), (0.5, 0.505e-3), (1.0, 1e-5), (1.7, 1e-5), (-0.2, 1e-3)],
)
def test_cosine_lr_values(progress, expected):
    # Half-way, cos(pi / 2) = 0, so the rate is the mean of the start and the 1 % floor.
    assert cosine_lr(1e-3, progress) == pytest.approx(expected)


def test_progress_follows_epochs_when_time_is_left():
    assert training_progress(10, 40, elapsed_s=60.0, max_minutes=10.0) == pytest.approx(0.25)


def test_progress_follows_time_when_budget_binds():
    assert training_progress(2, 40, elapsed_s=270.0, max_minutes=9.0) == pytest.approx(0.5)


def test_progress_stops_at_one():
    assert training_progress(5, 40, elapsed_s=700.0, max_minutes=9.0) == 1.0
