"""Tests of the synthetic image generator and the datasets it writes."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage
from skimage.measure import label

from ccflow.data import list_samples, load_pair, read_image
from ccflow.synthetic import (
    SyntheticConfig,
    generate_labelled_sample,
    generate_sample,
    write_synthetic_dataset,
)

SMALL = SyntheticConfig(
    height=300,
    width=400,
    cells_per_image=(6, 10),
    out_of_focus_per_image=(2, 4),
    debris_per_image=(5, 20),
    fibres_per_image=(1, 4),
)


def test_default_size_and_speed() -> None:
    generate_sample(0, SyntheticConfig(height=64, width=64))  # warm-up of imports and caches
    start = time.perf_counter()
    image, mask = generate_sample(1)
    elapsed = time.perf_counter() - start
    assert image.shape == (1200, 1600, 3)
    assert image.dtype == np.uint8
    assert mask.shape == (1200, 1600)
    assert mask.dtype == np.bool_
    # About 0.4 s of CPU time on a 2-core AMD EPYC VM. The bound leaves room for loaded CI machines.
    assert elapsed < 2.0


def test_seeded_determinism() -> None:
    first_image, first_mask = generate_sample(4, SMALL)
    second_image, second_mask = generate_sample(4, SMALL)
    other_image, _ = generate_sample(5, SMALL)
    assert np.array_equal(first_image, second_image)
    assert np.array_equal(first_mask, second_mask)
    assert not np.array_equal(first_image, other_image)


@pytest.mark.parametrize("seed", range(6))
def test_components_match_labelled_cells(seed: int) -> None:
    sample = generate_labelled_sample(seed, SMALL)
    assert sample.n_cells > 0
    assert int(label(sample.mask, connectivity=2).max()) == sample.n_cells
    assert sample.labels.dtype == np.int32
    assert set(np.unique(sample.labels).tolist()) == set(range(sample.n_cells + 1))

    # Every label is exactly one 8-connected component.
    components, _ = ndimage.label(sample.mask, structure=np.ones((3, 3), dtype=bool))
    for cell in range(1, sample.n_cells + 1):
        assert len(np.unique(components[sample.labels == cell])) == 1


def test_touching_pairs_stay_separate() -> None:
    config = replace(SMALL, touching_pair_fraction=1.0, cells_per_image=(8, 8))
    n_pairs = 0
    for seed in range(4):
        sample = generate_labelled_sample(seed, config)
        components = label(sample.mask, connectivity=2)
        for first, second in sample.touching_pairs:
            first_pixels = sample.labels == first
            second_pixels = sample.labels == second
            assert np.unique(components[first_pixels]).size == 1
            assert np.unique(components[first_pixels])[0] != np.unique(components[second_pixels])[0]
            # The outlines meet: at most 3 px of background lie between the two cells.
            grown = ndimage.binary_dilation(first_pixels, structure=np.ones((7, 7), dtype=bool))
            assert (grown & second_pixels).any()
            n_pairs += 1
    assert n_pairs >= 4


def test_value_ranges_and_colour() -> None:
    sample = generate_labelled_sample(2)
    image = sample.image.astype(np.float64)
    cells = sample.mask
    assert sample.n_cells >= 5
    red, green, blue = (image[:, :, channel] for channel in range(3))

    assert float(np.median(red[~cells])) < 20
    assert red[cells].mean() > 50
    # Yellow to orange: red brightest, green close behind, blue near zero.
    assert red[cells].mean() > green[cells].mean() > 4 * blue[cells].mean()
    assert int(sample.image.max()) <= 255
    assert int(sample.image.min()) == 0


def test_cell_diameters_in_range() -> None:
    config = replace(SMALL, out_of_focus_per_image=(0, 0))
    sample = generate_labelled_sample(3, config)
    areas = np.bincount(sample.labels.ravel())[1:]
    diameters = np.sqrt(4 * areas / np.pi)
    # Border cells are cut, so only the upper bound holds for all of them.
    assert diameters.max() <= 60 * 1.3
    assert np.median(diameters) >= 15


def test_dim_cells_left_unlabelled() -> None:
    dim = replace(
        SMALL,
        cells_per_image=(0, 0),
        out_of_focus_per_image=(6, 6),
        out_of_focus_brightness=(0.05, 0.1),
    )
    sample = generate_labelled_sample(0, dim)
    assert sample.n_cells == 0
    assert sample.n_unlabelled_cells >= 1
    assert not sample.mask.any()

    bright = replace(dim, out_of_focus_brightness=(0.8, 0.9), out_of_focus_blur_px=(3.0, 3.0))
    sample = generate_labelled_sample(0, bright)
    assert sample.n_unlabelled_cells == 0
    assert sample.n_cells >= 1


def test_invalid_config_rejected() -> None:
    with pytest.raises(ValueError, match="cell_diameter_px"):
        generate_sample(0, replace(SMALL, cell_diameter_px=(30.0, 10.0)))
    with pytest.raises(ValueError, match="touching_pair_fraction"):
        generate_sample(0, replace(SMALL, touching_pair_fraction=1.5))


def test_write_dataset_readable(tmp_path: Path) -> None:
    dest = write_synthetic_dataset(tmp_path / "synth", n_images=3, seed=1, config=SMALL)
    assert dest == tmp_path / "synth"
    samples = list_samples(dest, require_masks=True)
    assert [sample.name for sample in samples] == ["synth_000", "synth_001", "synth_002"]

    counts = json.loads((dest / "synthetic.json").read_text())["cell_counts"]
    for sample in samples:
        assert sample.mask_path is not None
        raw_mask = read_image(sample.mask_path)
        assert set(np.unique(raw_mask).tolist()) <= {0, 255}
        image, mask = load_pair(sample)
        assert image.shape == (300, 400, 3)
        assert int(label(mask, connectivity=2).max()) == counts[sample.name]


def test_write_dataset_idempotent(tmp_path: Path) -> None:
    dest = write_synthetic_dataset(tmp_path, n_images=2, seed=0, config=SMALL)
    image_path = dest / "images" / "synth_000.png"
    first_mtime = image_path.stat().st_mtime_ns
    first_bytes = image_path.read_bytes()

    write_synthetic_dataset(tmp_path, n_images=2, seed=0, config=SMALL)
    assert image_path.stat().st_mtime_ns == first_mtime

    write_synthetic_dataset(tmp_path, n_images=1, seed=9, config=SMALL)
    assert image_path.read_bytes() != first_bytes
    assert not (dest / "images" / "synth_001.png").exists()
    assert not (dest / "masks" / "synth_001.png").exists()
    assert len(list_samples(dest, require_masks=True)) == 1


def test_write_dataset_same_seed_same_files(tmp_path: Path) -> None:
    first = write_synthetic_dataset(tmp_path / "a", n_images=2, seed=3, config=SMALL)
    second = write_synthetic_dataset(tmp_path / "b", n_images=2, seed=3, config=SMALL)
    for folder in ("images", "masks"):
        for name in ("synth_000.png", "synth_001.png"):
            assert (first / folder / name).read_bytes() == (second / folder / name).read_bytes()
