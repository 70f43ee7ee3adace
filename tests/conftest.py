"""Fixtures shared by the test suite."""

import os
from pathlib import Path

# albumentations queries pypi.org for its latest version on import unless this is set;
# the tests must not reach any outside host.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# MLflow 3 sends usage telemetry unless one of these is set; servers started by the tests
# inherit them.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
FNC_SAMPLE_DIR = REPO_ROOT.parent / "shared" / "data" / "fnc-yellow-sample"
TEST_EXPERIMENT = "ccflow-tests"

# Cell counts of the four sample masks (8-connected components), from the data README.
FNC_SAMPLE_COUNTS = {
    "Mar19bS1C4R2_LHr_200x": 13,
    "Mar23bS1C2R3_VLPAGr_200x": 4,
    "Mar24bS1C2R3_LHl_200x": 6,
    "Mar32bS2C2R2_DMl_200x": 35,
}


@pytest.fixture(scope="session")
def fnc_sample_dir() -> Path:
    """Return the folder of the four real FNC sample images, or skip when it is absent."""
    if not (FNC_SAMPLE_DIR / "images").is_dir():
        pytest.skip(f"FNC sample data not found at {FNC_SAMPLE_DIR}; it lives in ../shared/data")
    return FNC_SAMPLE_DIR


@pytest.fixture(scope="session")
def ray_cluster():
    """Start one local Ray instance for the whole test session."""
    import ray

    ray.init(num_cpus=2, configure_logging=False, _node_ip_address="127.0.0.1")
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def mlflow_backend(tmp_path_factory):
    """Point MLflow at a fresh SQLite backend, as a local user without a server has."""
    import mlflow

    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    # Without an explicit location, artifacts would land in ./mlruns of the working folder.
    mlflow.create_experiment(TEST_EXPERIMENT, artifact_location=(root / "artifacts").as_uri())
    yield uri
    mlflow.set_tracking_uri(previous)


# Settings for tests that train: a tiny network on few small crops, two epochs.
TINY_TRAINING = dict(
    base_width=4,
    epochs=2,
    patience=5,
    crop_size=256,
    batch_size=4,
    samples_per_epoch=8,
    scale=0.5,
    experiment=TEST_EXPERIMENT,
)


@pytest.fixture(scope="session")
def trained_fnc_model(fnc_sample_dir, mlflow_backend, ray_cluster):
    """Train a tiny c-ResUnet for two epochs on the FNC sample and register it."""
    from ccflow.train import TrainConfig, train

    return train(TrainConfig(data=fnc_sample_dir, loss="focal", threshold="auto", **TINY_TRAINING))
