"""Promotion gate: first champion, a worse version rejected, a forced one recorded."""

import dataclasses
import json
import shutil

import mlflow
import numpy as np
import pytest
import torch
from skimage.segmentation import find_boundaries
from typer.testing import CliRunner

from ccflow import CHALLENGER_ALIAS, CHAMPION_ALIAS
from ccflow.cli import app
from ccflow.data import dataset_fingerprint, list_samples, read_image
from ccflow.promote import PromotionError, compare, promote
from ccflow.registry import encode_png, load_counter, log_counter_model
from tests.conftest import TEST_EXPERIMENT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

# A model name of its own keeps these aliases apart from the other tests' versions.
GATE_MODEL = "ccflow-promote-test"


@pytest.fixture(scope="module")
def gate_versions(trained_fnc_model, tmp_path_factory):
    """Register the trained weights twice: as trained, and with post-processing that
    drops every object (min size above the image area), so it finds no cell at all."""
    counter = load_counter(trained_fnc_model.model_uri)
    config = mlflow.pyfunc.load_model(trained_fnc_model.model_uri).model_config
    weights = tmp_path_factory.mktemp("gate") / "weights.pt"
    torch.save(counter.model.state_dict(), weights)

    versions = {}
    variants = {
        "good": counter.postprocess,
        "blind": dataclasses.replace(counter.postprocess, min_size_px=10**7),
    }
    mlflow.set_experiment(TEST_EXPERIMENT)
    for label, postprocess in variants.items():
        with mlflow.start_run(run_name=f"gate-{label}"):
            info = log_counter_model(
                weights=weights,
                arch=config["arch"],
                base_width=int(config["base_width"]),
                scale=float(config["scale"]),
                tile_size=int(config["tile_size"]),
                postprocess=postprocess,
                registered_model_name=GATE_MODEL,
            )
        versions[label] = str(info.registered_model_version)
    return versions


@pytest.fixture(scope="module")
def eval_dir(trained_fnc_model, fnc_sample_dir, tmp_path_factory):
    """Two FNC images labelled with the cells that the trained model finds in them.

    A two-epoch network of width 4 finds few of the expert-annotated cells, so its score
    on the real masks could be 0, like the blind version's. On its own labels it scores
    high, which makes the gate's decision certain without a well-trained model. The
    outline of each label is removed so that touching labels stay separate components.
    """
    counter = load_counter(trained_fnc_model.model_uri)
    folder = tmp_path_factory.mktemp("gate-eval")
    (folder / "images").mkdir()
    (folder / "masks").mkdir()
    for name in ("Mar19bS1C4R2_LHr_200x", "Mar32bS2C2R2_DMl_200x"):
        source = fnc_sample_dir / "images" / f"{name}.png"
        shutil.copy(source, folder / "images" / source.name)
        labels = counter.count(read_image(source)).labels
        cells = (labels > 0) & ~find_boundaries(labels, connectivity=2, mode="inner")
        (folder / "masks" / source.name).write_bytes(encode_png(np.where(cells, 255, 0).astype(np.uint8)))
    return folder


@pytest.fixture(scope="module")
def first_promotion(gate_versions, eval_dir):
    return promote(gate_versions["good"], eval_dir, model_name=GATE_MODEL, user="tester")


@pytest.fixture(scope="module")
def rejected_promotion(gate_versions, eval_dir, first_promotion):
    return promote(gate_versions["blind"], eval_dir, model_name=GATE_MODEL, user="tester")


@pytest.fixture(scope="module")
def forced_promotion(gate_versions, eval_dir, rejected_promotion):
    return CliRunner().invoke(
        app,
        [
            "promote", gate_versions["blind"], "--data", str(eval_dir),
            "--model-name", GATE_MODEL, "--force", "--reason", "rollback drill",
        ],
    )


def _alias(name):
    return str(mlflow.MlflowClient().get_model_version_by_alias(GATE_MODEL, name).version)


def test_first_version_becomes_champion(first_promotion, gate_versions, eval_dir):
    version = mlflow.MlflowClient().get_model_version(GATE_MODEL, gate_versions["good"])
    fingerprint = dataset_fingerprint(list_samples(eval_dir, require_masks=True))

    assert first_promotion.decision == "promoted"
    assert first_promotion.champion_version is None
    assert _alias(CHAMPION_ALIAS) == gate_versions["good"]
    assert version.tags["promotion.decision"] == "promoted"
    assert version.tags["promotion.user"] == "tester"
    assert version.tags["promotion.data_fingerprint"] == fingerprint
    assert version.tags["promotion.champion_version"] == "none"
    assert float(version.tags["promotion.candidate_det_f1"]) == pytest.approx(
        first_promotion.candidate_metrics["det_f1"], abs=1e-4
    )
    assert first_promotion.candidate_metrics["det_f1"] > 0.5


def test_worse_version_rejected(rejected_promotion, gate_versions):
    version = mlflow.MlflowClient().get_model_version(GATE_MODEL, gate_versions["blind"])

    assert rejected_promotion.decision == "rejected"
    assert rejected_promotion.candidate_metrics["pred_count"] == 0
    assert rejected_promotion.candidate_metrics["det_f1"] == 0.0
    assert rejected_promotion.champion_version == gate_versions["good"]
    assert "detection F1" in rejected_promotion.reason
    assert _alias(CHAMPION_ALIAS) == gate_versions["good"]
    assert _alias(CHALLENGER_ALIAS) == gate_versions["blind"]
    assert version.tags["promotion.decision"] == "rejected"
    assert version.tags["promotion.champion_version"] == gate_versions["good"]
    assert float(version.tags["promotion.champion_det_f1"]) > 0.5


def test_decision_run_records_metrics(rejected_promotion):
    run = mlflow.MlflowClient().get_run(rejected_promotion.run_id)

    assert run.data.tags["promotion.decision"] == "rejected"
    assert run.data.metrics["candidate_det_f1"] == 0.0
    assert run.data.metrics["champion_det_f1"] == pytest.approx(
        rejected_promotion.champion_metrics["det_f1"]
    )


def test_forced_version_records_reason(forced_promotion, gate_versions):
    version = mlflow.MlflowClient().get_model_version(GATE_MODEL, gate_versions["blind"])
    summary = json.loads(forced_promotion.stdout[forced_promotion.stdout.index("{"):])

    assert forced_promotion.exit_code == 0, forced_promotion.output
    assert summary["decision"] == "forced"
    assert _alias(CHAMPION_ALIAS) == gate_versions["blind"]
    assert version.tags["promotion.decision"] == "forced"
    assert version.tags["promotion.reason"] == "rollback drill"
    assert version.tags["promotion.champion_version"] == gate_versions["good"]
    assert "promotion.champion_count_mape" in version.tags
    # The forced version no longer waits as challenger.
    with pytest.raises(mlflow.exceptions.MlflowException):
        _alias(CHALLENGER_ALIAS)


def test_force_without_reason_rejected(gate_versions, eval_dir):
    with pytest.raises(PromotionError, match="--reason"):
        promote(gate_versions["blind"], eval_dir, model_name=GATE_MODEL, force=True)


def test_cli_without_data_exits(monkeypatch):
    monkeypatch.delenv("CCFLOW_PROMOTION_DATA", raising=False)

    result = CliRunner().invoke(app, ["promote", "1", "--model-name", GATE_MODEL])

    assert result.exit_code == 2


def test_compare_applies_tolerances():
    champion = {"det_f1": 0.80, "count_mape": 10.0}

    assert compare({"det_f1": 0.79, "count_mape": 11.0}, champion)[0]
    assert not compare({"det_f1": 0.70, "count_mape": 10.0}, champion)[0]
    assert not compare({"det_f1": 0.80, "count_mape": 13.0}, champion)[0]
    assert not compare({"det_f1": 0.79, "count_mape": 10.0}, champion, tolerance_f1=0.0)[0]
    assert compare({"det_f1": 0.85, "count_mape": 5.0}, champion)[0]


def test_compare_rejects_nan_score():
    champion = {"det_f1": 0.80, "count_mape": 10.0}

    passed, reason = compare({"det_f1": 0.9, "count_mape": float("nan")}, champion)

    assert not passed
    assert "count MAPE" in reason
