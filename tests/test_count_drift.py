"""Validation and drift in counting: invalid images, drift scores on the job's MLflow run.

The drift runs count the four FNC sample images at full size (1600 x 1200), because the
reference profile of the trained model comes from those images at that size. Resized
images have other intensity histograms and would drift by themselves.
"""

import json
import logging
import shutil

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from ccflow.batch import CountJobConfig, run_count_job
from ccflow.cli import app
from ccflow.count import count_folder
from ccflow.drift import DEFAULT_THRESHOLD, DriftAccumulator
from ccflow.monitor import recent_counting_runs
from ccflow.registry import load_counter
from tests.conftest import FNC_SAMPLE_COUNTS

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NAMES = sorted(FNC_SAMPLE_COUNTS)
EXPERIMENT = "ccflow-counting-drift-tests"
INVALID = {
    "blank.png": "the frame is not blank",
    "blurred.png": "the image is in focus",
    "saturated.png": "pixels are saturated",
}


@pytest.fixture(scope="module")
def experiment(mlflow_backend, tmp_path_factory):
    """Create an experiment of its own, so that the monitor reads only these counting runs."""
    location = tmp_path_factory.mktemp("drift-artifacts").as_uri()
    mlflow.MlflowClient().create_experiment(EXPERIMENT, artifact_location=location)
    return EXPERIMENT


def _invalid_images(fnc_sample_dir) -> dict[str, np.ndarray]:
    """A uniform frame, a blurred and a saturated FNC image (BGR, as OpenCV writes them)."""
    image = cv2.imread(str(fnc_sample_dir / "images" / f"{NAMES[0]}.png"), cv2.IMREAD_COLOR)
    small = cv2.resize(image, (400, 300), interpolation=cv2.INTER_AREA)
    return {
        "blank.png": np.full((300, 400, 3), 30, dtype=np.uint8),
        # Blurred at full size: the focus threshold is set for sharp 1600 x 1200 images.
        "blurred.png": cv2.GaussianBlur(image, (0, 0), 4),
        "saturated.png": np.clip(small.astype(np.float32) * 8, 0, 255).astype(np.uint8),
    }


@pytest.fixture(scope="module")
def sample_with_invalid(fnc_sample_dir, tmp_path_factory):
    """The four FNC images plus three images that fail the counting suite."""
    folder = tmp_path_factory.mktemp("drift-input")
    for name in NAMES:
        shutil.copy(fnc_sample_dir / "images" / f"{name}.png", folder / f"{name}.png")
    for name, image in _invalid_images(fnc_sample_dir).items():
        cv2.imwrite(str(folder / name), image)
    return folder


@pytest.fixture(scope="module")
def recoloured_sample(fnc_sample_dir, tmp_path_factory):
    """The four FNC images with red and blue swapped: yellow cells turn cyan."""
    folder = tmp_path_factory.mktemp("drift-recoloured")
    for name in NAMES:
        image = cv2.imread(str(fnc_sample_dir / "images" / f"{name}.png"), cv2.IMREAD_COLOR)
        cv2.imwrite(str(folder / f"{name}.png"), image[:, :, ::-1])
    return folder


def _manifests(output) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((output / "runs").glob("*.json"))]


@pytest.fixture(scope="module")
def sample_job(sample_with_invalid, trained_fnc_model, experiment, tmp_path_factory):
    """The CLI job over the sample with invalid images, then a second run over the same folder."""
    output = tmp_path_factory.mktemp("drift-output")
    arguments = [
        "count", str(sample_with_invalid), str(output), "--model", trained_fnc_model.model_uri,
        "--experiment", experiment, "--no-energy", "--no-overlays", "--batch-size", "4",
    ]
    first = CliRunner().invoke(app, arguments)
    second = CliRunner().invoke(app, arguments)
    return output, first, second


@pytest.fixture(scope="module")
def recoloured_job(recoloured_sample, trained_fnc_model, experiment, tmp_path_factory):
    output = tmp_path_factory.mktemp("drift-recoloured-output")
    config = CountJobConfig(
        str(recoloured_sample), str(output), trained_fnc_model.model_uri,
        overlays=False, batch_size=4, concurrency=1, experiment=experiment, energy=False,
    )
    return run_count_job(config)


# --------------------------------------------------------------------------------------
# Drift state sent from the actors to the driver
# --------------------------------------------------------------------------------------


def test_drift_state_survives_json_and_merges():
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(2)]
    labels = [rng.integers(0, 4, (48, 64)) for _ in range(2)]
    first, second, single = DriftAccumulator(), DriftAccumulator(), DriftAccumulator()
    first.update(images[0], labels[0])
    second.update(images[1], labels[1])
    for image, label in zip(images, labels, strict=True):
        single.update(image, label)

    received = DriftAccumulator.from_state(json.loads(json.dumps(first.to_state())))
    merged = received.merge(DriftAccumulator.from_state(json.loads(json.dumps(second.to_state()))))

    assert merged.images == 2
    assert merged.labelled_images == 2
    for name, counts in single.counts.items():
        assert np.array_equal(merged.counts[name], counts), name
    merged_statistics = merged.to_profile()["channel_statistics"]
    for channel, statistics in single.to_profile()["channel_statistics"].items():
        assert merged_statistics[channel] == pytest.approx(statistics), channel


def test_empty_drift_state_round_trips():
    restored = DriftAccumulator.from_state(json.loads(json.dumps(DriftAccumulator().to_state())))

    assert restored.images == 0
    assert np.isinf(restored.minimum).all()


# --------------------------------------------------------------------------------------
# Invalid images in the Ray Data job
# --------------------------------------------------------------------------------------


def test_invalid_images_get_invalid_rows(sample_job):
    output, first, _ = sample_job
    counts = pd.read_csv(output / "counts.csv").set_index("file")

    assert first.exit_code == 1, first.output
    for name, expectation in INVALID.items():
        assert counts.loc[name, "status"] == "invalid", name
        assert expectation in counts.loc[name, "error"], counts.loc[name, "error"]
        assert pd.isna(counts.loc[name, "count"]), name
    assert counts.loc["blank.png", "width"] == 400


def test_valid_images_counted_beside_invalid(sample_job):
    output, _, _ = sample_job
    counts = pd.read_csv(output / "counts.csv").set_index("file")
    cells = pd.read_csv(output / "cells.csv")

    ok = counts[counts["status"] == "ok"]
    assert sorted(ok.index) == [f"{name}.png" for name in NAMES]
    assert set(cells["file"]) <= set(ok.index)


def test_invalid_images_in_ledger_manifest_and_run(sample_job):
    output, first, _ = sample_job
    ledger = pd.read_csv(output / "ledger.csv").set_index("file")
    manifest = _manifests(output)[0]
    run = mlflow.get_run(manifest["mlflow_run_id"])

    assert sorted(ledger.index[ledger["status"] == "invalid"]) == sorted(INVALID)
    assert manifest["images_invalid"] == 3
    assert manifest["images_counted"] == 4
    assert manifest["stage_seconds"]["validate"] > 0
    assert run.data.metrics["images_invalid"] == 3
    assert "3 invalid" in first.output


def test_unchanged_invalid_images_not_checked_again(sample_job):
    output, _, second = sample_job
    manifest = _manifests(output)[1]
    run = mlflow.get_run(manifest["mlflow_run_id"])

    assert second.exit_code == 0, second.output
    assert manifest["images_skipped"] == 7
    assert manifest["images_invalid"] == 0
    assert manifest["drift"]["scored"] is False
    assert "drift_overall" not in run.data.metrics
    assert run.data.tags["drift_skipped"] == "no images to count"


# --------------------------------------------------------------------------------------
# Drift on the job's MLflow run
# --------------------------------------------------------------------------------------


def test_sample_drift_is_low(sample_job):
    output, first, _ = sample_job
    manifest = _manifests(output)[0]
    run = mlflow.get_run(manifest["mlflow_run_id"])

    # Only the four counted images are profiled, not the three invalid ones.
    assert manifest["drift"]["images"] == 4
    assert manifest["drift"]["flagged"] is False
    assert run.data.tags["drift_flagged"] == "false"
    assert run.data.tags["drift_method"] == "psi"
    assert run.data.metrics["drift_overall"] < 0.1
    assert run.data.metrics["drift_overall"] == pytest.approx(manifest["drift"]["overall"], abs=1e-4)
    assert "not flagged" in first.output


def test_colour_change_is_flagged(recoloured_job):
    run = mlflow.get_run(recoloured_job["mlflow_run_id"])

    assert recoloured_job["images_counted"] == 4
    assert run.data.tags["drift_flagged"] == "true"
    assert run.data.metrics["drift_overall"] > DEFAULT_THRESHOLD
    assert run.data.metrics["drift_hue"] > DEFAULT_THRESHOLD
    assert recoloured_job["drift"]["flagged"] is True


def test_monitor_reads_job_runs(sample_job, recoloured_job, experiment):
    runs = recent_counting_runs(experiment, limit=10).set_index("run_id")
    sample_run = _manifests(sample_job[0])[0]["mlflow_run_id"]
    recoloured_run = recoloured_job["mlflow_run_id"]

    assert runs.loc[sample_run, "drift_flagged"] == False  # noqa: E712 (None must not pass)
    assert runs.loc[recoloured_run, "drift_flagged"] == True  # noqa: E712
    assert runs.loc[recoloured_run, "images_counted"] == 4
    assert runs.loc[recoloured_run, "cells"] == recoloured_job["cells"]


def test_model_without_reference_skips_drift(fnc_sample_dir, trained_fnc_model, experiment, tmp_path, caplog):
    # A run without artifacts is like the training run of a model from before ccflow
    # logged drift references.
    client = mlflow.MlflowClient()
    bare_run = client.create_run(client.get_experiment_by_name(experiment).experiment_id).info.run_id
    client.set_terminated(bare_run)
    source = tmp_path / "in"
    source.mkdir()
    for name, image in _invalid_images(fnc_sample_dir).items():
        if name != "blurred.png":
            cv2.imwrite(str(source / name), image)
    config = CountJobConfig(
        str(source), str(tmp_path / "out"), f"runs:/{bare_run}/model",
        overlays=False, concurrency=1, experiment=experiment, energy=False, validate=False,
    )

    with caplog.at_level(logging.WARNING, logger="ccflow"):
        manifest = run_count_job(config, counter=load_counter(trained_fnc_model.model_uri))

    # Without validation the blank and saturated frames are counted like any image.
    assert manifest["images_counted"] == 2
    assert manifest["images_invalid"] == 0
    assert manifest["drift"]["scored"] is False
    assert "reference_profile.json" in manifest["drift"]["reason"]
    assert "drift_flagged" not in mlflow.get_run(manifest["mlflow_run_id"]).data.tags
    assert any("Drift is not scored" in record.getMessage() for record in caplog.records)


# --------------------------------------------------------------------------------------
# The in-process loop
# --------------------------------------------------------------------------------------


def test_count_folder_marks_invalid_images(fnc_sample_dir, trained_fnc_model, tmp_path):
    source = tmp_path / "in"
    source.mkdir()
    for name, image in _invalid_images(fnc_sample_dir).items():
        if name != "blurred.png":
            cv2.imwrite(str(source / name), image)
    shutil.copy(fnc_sample_dir / "images" / f"{NAMES[0]}.png", source / "good.png")
    counter = load_counter(trained_fnc_model.model_uri)
    drift = DriftAccumulator()

    summary = count_folder(source, tmp_path / "out", counter, overlays=False, drift=drift)

    counts = pd.read_csv(tmp_path / "out" / "counts.csv").set_index("file")
    assert summary.counted == 1
    assert summary.invalid == 2
    assert summary.failed == 0
    assert counts.loc["good.png", "status"] == "ok"
    assert INVALID["blank.png"] in counts.loc["blank.png", "error"]
    assert INVALID["saturated.png"] in counts.loc["saturated.png", "error"]
    assert drift.images == 1
