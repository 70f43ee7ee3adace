"""Drift profiles, PSI scores, MLflow logging of drift and the monitor command."""

import math

import mlflow
import numpy as np
import pytest
from typer.testing import CliRunner

from ccflow import REGISTERED_MODEL_NAME
from ccflow.cli import app
from ccflow.data import read_image
from ccflow.drift import (
    DEFAULT_THRESHOLD,
    DriftAccumulator,
    load_reference,
    log_drift,
    population_stability_index,
)
from ccflow.monitor import recent_counting_runs


def test_psi_of_identical_histograms_is_zero():
    assert population_stability_index([5, 10, 85], [1, 2, 17]) == pytest.approx(0.0)


def test_psi_matches_hand_computation():
    # p = (0.5, 0.5), q = (0.9, 0.1): 0.4 ln(1.8) - 0.4 ln(0.2) = 0.4 ln 9.
    assert population_stability_index([50, 50], [90, 10]) == pytest.approx(0.4 * math.log(9))


def test_psi_stays_finite_for_empty_bins():
    assert math.isfinite(population_stability_index([100, 0], [0, 100]))


def test_merged_accumulators_equal_one_stream():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (64, 80, 3), dtype=np.uint8) for _ in range(3)]
    labels = [rng.integers(0, 3, (64, 80)) for _ in range(3)]
    single = DriftAccumulator()
    for image, label in zip(images, labels, strict=True):
        single.update(image, label)
    first, second = DriftAccumulator(), DriftAccumulator()
    first.update(images[0], labels[0])
    for image, label in zip(images[1:], labels[1:], strict=True):
        second.update(image, label)

    merged = first.merge(second)

    assert merged.images == 3
    for name, counts in single.counts.items():
        assert np.array_equal(merged.counts[name], counts), name
    merged_statistics = merged.to_profile()["channel_statistics"]
    for channel, statistics in single.to_profile()["channel_statistics"].items():
        assert merged_statistics[channel] == pytest.approx(statistics), channel


def test_report_skips_features_with_few_observations():
    image = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    labels = np.zeros((64, 64), dtype=np.int32)
    labels[10:20, 10:20] = 1
    reference = DriftAccumulator()
    reference.update(image, labels)
    current = DriftAccumulator()
    current.update(image)

    report = current.report(reference.to_profile())

    assert "cell_area" in report.skipped
    assert "foreground_fraction" in report.skipped
    assert report.per_feature["intensity_red"] == pytest.approx(0.0)
    assert not report.flagged


def test_profile_round_trip_keeps_histograms():
    image = np.random.default_rng(2).integers(0, 65536, (40, 50, 3), dtype=np.uint16)
    accumulator = DriftAccumulator()
    accumulator.update(image)

    restored = DriftAccumulator.from_profile(accumulator.to_profile())

    for name, counts in accumulator.counts.items():
        assert np.array_equal(restored.counts[name], counts), name


# --------------------------------------------------------------------------------------
# Against the reference logged by a real training run on the FNC sample
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fnc_images(fnc_sample_dir):
    return [read_image(path) for path in sorted((fnc_sample_dir / "images").glob("*.png"))]


@pytest.fixture(scope="module")
def reference(trained_fnc_model):
    return load_reference(f"models:/{REGISTERED_MODEL_NAME}/{trained_fnc_model.model_version}")


@pytest.fixture(scope="module")
def counter(trained_fnc_model):
    from ccflow.registry import load_counter

    return load_counter(trained_fnc_model.model_uri)


def accumulate(images, counter) -> DriftAccumulator:
    accumulator = DriftAccumulator()
    for image in images:
        accumulator.update(image, counter.count(image).labels)
    return accumulator



@pytest.mark.slow
def test_reference_is_logged_with_the_model(reference, trained_fnc_model):
    assert reference["images"] == 4
    assert len(reference["images_used"]) == 4
    assert len(reference["predicted_images"]) == 1
    assert reference["labelled_images"] == 1
    assert set(reference["channel_statistics"]) == {"red", "green", "blue"}
    assert sum(reference["features"]["hue"]["counts"]) > 0
    by_run = load_reference(f"runs:/{trained_fnc_model.run_id}/model")
    assert by_run["features"] == reference["features"]


@pytest.mark.slow
def test_fnc_sample_has_low_drift(fnc_images, reference, counter):
    report = accumulate(fnc_images, counter).report(reference)

    assert not report.flagged
    assert report.overall < 0.1
    assert report.images == 4
    assert report.method == "psi"


@pytest.mark.slow
def test_brightness_change_is_flagged(fnc_images, reference, counter):
    brighter = [np.clip(image.astype(np.float32) * 2.5, 0, 255).astype(np.uint8) for image in fnc_images]

    report = accumulate(brighter, counter).report(reference)

    assert report.flagged
    assert report.overall > DEFAULT_THRESHOLD
    assert report.per_feature["intensity_red"] > DEFAULT_THRESHOLD


@pytest.mark.slow
def test_colour_change_is_flagged(fnc_images, reference):
    # Yellow (red + green) cells become cyan (green + blue); image features only.
    accumulator = DriftAccumulator()
    for image in fnc_images:
        accumulator.update(image[:, :, ::-1])

    report = accumulator.report(reference)

    assert report.flagged
    assert report.per_feature["hue"] > DEFAULT_THRESHOLD
    assert "cell_area" in report.skipped


# --------------------------------------------------------------------------------------
# MLflow logging and the monitor
# --------------------------------------------------------------------------------------


def make_counting_run(client, experiment_id, cells: float, images: float, drift: float, flagged: bool, start: int):
    """Create a finished counting run as the counting job logs it."""
    from ccflow.drift import DriftReport

    run = client.create_run(experiment_id, start_time=start)
    client.log_metric(run.info.run_id, "cells", cells)
    client.log_metric(run.info.run_id, "images_counted", images)
    report = DriftReport(
        per_feature={"hue": drift}, overall=drift, flagged=flagged, method="psi", threshold=DEFAULT_THRESHOLD
    )
    log_drift(report, client, run.info.run_id)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def test_monitor_shows_trend_and_writes_plot(tmp_path, mlflow_backend):
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("monitor-test", artifact_location=(tmp_path / "a").as_uri())
    old = make_counting_run(client, experiment_id, 40, 4, 0.05, False, start=1_700_000_000_000)
    new = make_counting_run(client, experiment_id, 90, 3, 0.8, True, start=1_700_000_100_000)

    runs = recent_counting_runs("monitor-test", limit=5)
    result = CliRunner().invoke(
        app, ["monitor", "--experiment", "monitor-test", "--plot", str(tmp_path / "trend.png")]
    )

    assert runs["run_id"].tolist() == [new, old]
    assert runs["drift_flagged"].tolist() == [True, False]
    assert runs["cells_per_image"].tolist() == pytest.approx([30.0, 10.0])
    assert runs["drift_overall"].tolist() == pytest.approx([0.8, 0.05])
    assert result.exit_code == 0, result.output
    assert "FLAGGED" in result.output
    assert (tmp_path / "trend.png").stat().st_size > 0
    tags = client.get_run(new).data.tags
    assert tags["drift_flagged"] == "true"
    assert tags["drift_method"] == "psi"
    assert client.get_run(new).data.metrics["drift_hue"] == pytest.approx(0.8)


def test_monitor_rejects_unknown_experiment(mlflow_backend):
    result = CliRunner().invoke(app, ["monitor", "--experiment", "no-such-experiment"])

    assert result.exit_code == 2
