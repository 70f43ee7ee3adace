"""Tests of the classical baseline on synthetic discs and on the four real FNC images."""

import numpy as np
import pytest

from ccflow.classical import classical_labels
from ccflow.data import list_samples, load_pair
from ccflow.metrics import image_metrics, label_mask, pooled_metrics
from ccflow.postprocess import count_cells
from tests.conftest import FNC_SAMPLE_COUNTS

YELLOW = np.array([0.8, 0.6, 0.05], dtype=np.float32)
BACKGROUND = 0.02


def yellow_discs(shape: tuple[int, int], centers: list[tuple[int, int]], radius: float) -> np.ndarray:
    """Return a float32 RGB image with yellow discs on a dark background."""
    rows, cols = np.indices(shape)
    image = np.full((*shape, 3), BACKGROUND, dtype=np.float32)
    for row, col in centers:
        inside = (rows - row) ** 2 + (cols - col) ** 2 <= radius**2
        image[inside] = YELLOW
    return image


def test_separate_discs_found():
    centers = [(40, 40), (40, 120), (100, 80)]
    image = yellow_discs((140, 160), centers, radius=15)
    labels = classical_labels(image)
    assert labels.dtype == np.int32
    assert count_cells(labels) == 3
    found = {int(labels[row, col]) for row, col in centers}
    assert found == {1, 2, 3}


def test_touching_discs_split():
    # Radius 15 and centres 27 px apart: one connected component with a neck.
    image = yellow_discs((80, 120), [(40, 40), (40, 67)], radius=15)
    labels = classical_labels(image)
    assert count_cells(labels) == 2
    assert labels[40, 40] != labels[40, 67]


def test_small_blob_removed():
    # A disc of radius 6 covers about pi * 36 = 113 px, below min_size_px = 200.
    image = yellow_discs((80, 120), [(40, 30)], radius=15)
    small = yellow_discs((80, 120), [(40, 90)], radius=6)
    labels = classical_labels(np.maximum(image, small))
    assert count_cells(labels) == 1
    assert labels[40, 90] == 0


def test_noise_does_not_change_count():
    rng = np.random.default_rng(0)
    image = yellow_discs((140, 160), [(40, 40), (40, 120), (100, 80)], radius=15)
    noisy = np.clip(image + rng.normal(0.0, 0.03, image.shape), 0.0, 1.0).astype(np.float32)
    assert count_cells(classical_labels(noisy)) == 3


def test_constant_image_has_no_cells():
    labels = classical_labels(np.full((30, 40, 3), 0.3, dtype=np.float32))
    assert labels.shape == (30, 40)
    assert count_cells(labels) == 0


def test_rejects_raw_uint8_image():
    with pytest.raises(TypeError, match="uint8"):
        classical_labels(np.zeros((10, 10, 3), dtype=np.uint8))


def test_rejects_single_channel_image():
    with pytest.raises(TypeError, match=r"\(10, 10\)"):
        classical_labels(np.zeros((10, 10), dtype=np.float32))


def test_rejects_values_above_one():
    with pytest.raises(ValueError, match="255"):
        classical_labels(np.full((10, 10, 3), 255.0, dtype=np.float32))


def test_rejects_negative_sigma():
    with pytest.raises(ValueError, match="sigma"):
        classical_labels(np.zeros((10, 10, 3), dtype=np.float32), sigma=-1.0)


@pytest.fixture(scope="module")
def fnc_rows(fnc_sample_dir):
    """Return (name, image_metrics row) for the classical baseline on each FNC image."""
    rows = []
    for sample in list_samples(fnc_sample_dir, require_masks=True):
        image, mask = load_pair(sample)
        rows.append((sample.name, image_metrics(label_mask(mask), classical_labels(image))))
    return rows


def test_fnc_true_counts(fnc_rows):
    assert {name: row["true_count"] for name, row in fnc_rows} == FNC_SAMPLE_COUNTS


def test_fnc_every_image_has_cells(fnc_rows):
    for name, row in fnc_rows:
        assert row["pred_count"] > 0, name


def test_fnc_pooled_detection_near_reference(fnc_rows):
    # The reference baseline scores F1 0.596, precision 0.451, recall 0.879 and count
    # MAPE 96.7 % on these images. The defaults of classical_labels reproduce it closely.
    pooled = pooled_metrics([row for _, row in fnc_rows])
    assert 0.5 <= pooled["det_f1"] <= 0.7
    assert pooled["det_recall"] >= 0.8
    assert pooled["det_precision"] < pooled["det_recall"]
    assert 60.0 <= pooled["count_mape"] <= 130.0
