"""Counting a folder with a registered model: CSVs, overlays, bad files, CLI and pyfunc."""

import base64
import shutil
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from skimage.io import imread
from typer.testing import CliRunner

from ccflow.cli import app
from ccflow.count import count_folder, list_images
from ccflow.errors import DatasetError
from ccflow.registry import load_counter
from tests.conftest import FNC_SAMPLE_COUNTS, TEST_EXPERIMENT

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def folder_with_corrupt_file(fnc_sample_dir, tmp_path_factory):
    """The four FNC images plus a truncated PNG."""
    folder = tmp_path_factory.mktemp("count-input")
    for path in (fnc_sample_dir / "images").iterdir():
        shutil.copy(path, folder / path.name)
    data = (fnc_sample_dir / "images" / "Mar19bS1C4R2_LHr_200x.png").read_bytes()
    (folder / "broken.png").write_bytes(data[:2000])
    return folder


@pytest.fixture(scope="module")
def counted(folder_with_corrupt_file, trained_fnc_model, tmp_path_factory):
    output = tmp_path_factory.mktemp("count-output")
    result = CliRunner().invoke(
        app,
        [
            "count", str(folder_with_corrupt_file), str(output), "--model", trained_fnc_model.model_uri,
            "--experiment", TEST_EXPERIMENT, "--no-energy",
        ],
    )
    # Exit code 1: one image failed, the others were counted.
    assert result.exit_code == 1, result.output
    assert "Counted 4 images (1 failed" in result.output
    return output


def test_counts_csv_has_row_per_image(counted):
    counts = pd.read_csv(counted / "counts.csv")

    assert sorted(counts["file"]) == sorted([f"{n}.png" for n in FNC_SAMPLE_COUNTS] + ["broken.png"])
    ok = counts[counts["status"] == "ok"]
    assert len(ok) == 4
    assert (ok["width"] == 1600).all()
    assert (ok["height"] == 1200).all()


def test_corrupt_file_gets_error_row(counted):
    counts = pd.read_csv(counted / "counts.csv").set_index("file")

    assert counts.loc["broken.png", "status"] == "error"
    assert "broken.png" in counts.loc["broken.png", "error"]


def test_cells_csv_matches_counts(counted):
    counts = pd.read_csv(counted / "counts.csv")
    cells = pd.read_csv(counted / "cells.csv")
    per_file = cells.groupby("file").size()

    for row in counts[counts["status"] == "ok"].itertuples():
        assert per_file.get(row.file, 0) == row.count
    assert list(cells.columns) == [
        "file", "cell_id", "centroid_x", "centroid_y", "area_px",
        "equivalent_diameter_px", "mean_probability",
    ]
    assert (cells["centroid_x"].between(0, 1600)).all()
    assert (cells["area_px"] >= 200).all()


def test_overlay_per_counted_image(counted):
    overlays = sorted(p.name for p in (counted / "overlays").iterdir())

    assert overlays == sorted(f"{n}.png" for n in FNC_SAMPLE_COUNTS)
    overlay = imread(counted / "overlays" / overlays[0])
    assert overlay.shape == (1200, 1600, 3)


def test_pyfunc_predict_matches_count(trained_fnc_model, fnc_sample_dir, counted):
    model = mlflow.pyfunc.load_model(trained_fnc_model.model_uri)
    names = sorted(FNC_SAMPLE_COUNTS)[:2]
    frame = pd.DataFrame(
        {"image": [(fnc_sample_dir / "images" / f"{n}.png").read_bytes() for n in names]}
    )

    predicted = model.predict(frame, params={"overlay": True})

    counts = pd.read_csv(counted / "counts.csv").set_index("file")
    for name, row in zip(names, predicted.itertuples()):
        assert row.count == counts.loc[f"{name}.png", "count"]
        assert base64.b64decode(row.overlay)[:8] == b"\x89PNG\r\n\x1a\n"


def test_count_folder_without_overlays(trained_fnc_model, fnc_sample_dir, tmp_path):
    counter = load_counter(trained_fnc_model.model_uri)

    summary = count_folder(fnc_sample_dir / "images", tmp_path, counter, overlays=False)

    assert summary.counted == 4
    assert summary.failed == 0
    assert not any((tmp_path / "overlays").iterdir())


def test_ledger_lists_every_image(counted):
    ledger = pd.read_csv(counted / "ledger.csv")

    assert sorted(ledger["file"]) == sorted([f"{n}.png" for n in FNC_SAMPLE_COUNTS] + ["broken.png"])
    assert (ledger["sha256"].str.len() == 64).all()


def test_list_images_rejects_empty_folder(tmp_path):
    with pytest.raises(DatasetError, match="No images found"):
        list_images(tmp_path)


def test_list_images_rejects_missing_folder(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        list_images(tmp_path / "absent")


def test_empty_data_option_means_synthetic():
    from ccflow.cli import data_folder

    assert data_folder("") is None
    assert data_folder(None) is None
    assert data_folder("images") == Path("images")
