"""Tests of the training augmentation pipeline."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ccflow.augment import DISTORTING_TRANSFORM_NAMES, list_transform_names, training_transform


def image_and_mask(shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Return a float image that is bright on the mask's cells and dark elsewhere."""
    rng = np.random.default_rng(seed)
    mask = np.zeros(shape, dtype=np.uint8)
    for _ in range(12):
        row, col = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        mask[max(row - 8, 0) : row + 8, max(col - 8, 0) : col + 8] = 1
    image = np.repeat((0.1 + 0.7 * mask.astype(np.float32))[:, :, None], 3, axis=2)
    image += rng.normal(0.0, 0.02, image.shape).astype(np.float32)
    return np.clip(image, 0.0, 1.0), mask


def test_output_shapes_and_types() -> None:
    transform = training_transform(128, seed=0)
    image, mask = image_and_mask((200, 240))
    for _ in range(5):
        result = transform(image=image, mask=mask)
        assert result["image"].shape == (128, 128, 3)
        assert result["image"].dtype == np.float32
        assert result["mask"].shape == (128, 128)


def test_small_input_padded_to_crop() -> None:
    transform = training_transform(96, seed=1)
    image, mask = image_and_mask((50, 70))
    result = transform(image=image, mask=mask)
    assert result["image"].shape == (96, 96, 3)
    assert result["mask"].shape == (96, 96)


def test_mask_stays_binary() -> None:
    transform = training_transform(64, seed=2)
    image, mask = image_and_mask((100, 100))
    for seed in range(20):
        transform.set_random_seed(seed)
        values = set(np.unique(transform(image=image, mask=mask)["mask"]).tolist())
        assert values <= {0, 1}


def test_values_clipped_to_unit_range() -> None:
    transform = training_transform(64, seed=3)
    saturated = np.ones((80, 80, 3), dtype=np.float32)
    saturated[:40] = 0.0
    mask = np.zeros((80, 80), dtype=np.uint8)
    for seed in range(20):
        transform.set_random_seed(seed)
        result = transform(image=saturated, mask=mask)["image"]
        assert float(result.min()) >= 0.0
        assert float(result.max()) <= 1.0


def test_mask_follows_image_geometry() -> None:
    transform = training_transform(96, seed=4)
    image, mask = image_and_mask((160, 160))
    for seed in range(10):
        transform.set_random_seed(seed)
        result = transform(image=image, mask=mask)
        cells = result["mask"] == 1
        if cells.all() or not cells.any():
            continue
        brightness = result["image"].mean(axis=2)
        assert brightness[cells].mean() > brightness[~cells].mean() + 0.3


def test_seeded_repeatability() -> None:
    image, mask = image_and_mask((150, 150))
    first = training_transform(64)
    second = training_transform(64)
    first.set_random_seed(11)
    second.set_random_seed(11)
    result_first = first(image=image, mask=mask)
    result_second = second(image=image, mask=mask)
    assert np.array_equal(result_first["image"], result_second["image"])
    assert np.array_equal(result_first["mask"], result_second["mask"])


def test_no_distorting_transforms() -> None:
    names = list_transform_names(training_transform(64))
    for expected in ("Affine", "HorizontalFlip", "VerticalFlip", "RandomBrightnessContrast", "RandomCrop"):
        assert expected in names
    for name in names:
        for forbidden in DISTORTING_TRANSFORM_NAMES:
            assert forbidden not in name


def test_update_check_disabled() -> None:
    training_transform(32)
    assert os.environ.get("NO_ALBUMENTATIONS_UPDATE") is not None


def test_invalid_crop_size() -> None:
    with pytest.raises(ValueError, match="crop_size"):
        training_transform(0)
