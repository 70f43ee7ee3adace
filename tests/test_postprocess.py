"""Tests of ccflow.postprocess on hand-made probability maps."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from ccflow.postprocess import (
    MEASURE_COLUMNS,
    PostprocessConfig,
    count_cells,
    fill_small_holes,
    label_cells,
    measure_cells,
    relabel_consecutive,
    remove_small_objects,
)

HIGH = 0.9
LOW = 0.1

# Configs that switch off every step except the one under test.
ONLY_THRESHOLD = PostprocessConfig(hole_size_px=0, min_size_px=0, watershed=False)


def disc(shape: tuple[int, int], center: tuple[int, int], radius: float) -> np.ndarray:
    """Return a bool mask of the pixels whose centre lies within radius of center."""
    rows, cols = np.indices(shape)
    return (rows - center[0]) ** 2 + (cols - center[1]) ** 2 <= radius**2


def probability_from(mask: np.ndarray) -> np.ndarray:
    """Return a float32 map that is HIGH on the mask and LOW elsewhere."""
    return np.where(mask, HIGH, LOW).astype(np.float32)


# --- PostprocessConfig ---


def test_config_defaults():
    config = PostprocessConfig()
    assert config.threshold == 0.5
    assert config.hole_size_px == 50
    assert config.min_size_px == 200
    assert config.watershed is True
    assert config.footprint_px == 40


def test_config_dict_round_trip():
    config = PostprocessConfig(threshold=0.3, hole_size_px=10, min_size_px=5, watershed=False)
    values = config.to_dict()
    assert values == {
        "threshold": 0.3,
        "hole_size_px": 10,
        "min_size_px": 5,
        "watershed": False,
        "footprint_px": 40,
    }
    assert PostprocessConfig.from_dict(values) == config


def test_config_to_dict_plain_types():
    config = PostprocessConfig(threshold=np.float32(0.25), min_size_px=np.int64(7))
    values = config.to_dict()
    assert type(values["threshold"]) is float
    assert type(values["min_size_px"]) is int
    assert json.loads(json.dumps(values)) == values


def test_config_from_dict_missing_keys_default():
    assert PostprocessConfig.from_dict({"threshold": 0.7}) == PostprocessConfig(threshold=0.7)


def test_config_from_dict_unknown_key():
    with pytest.raises(ValueError, match="thresh"):
        PostprocessConfig.from_dict({"thresh": 0.5})


@pytest.mark.parametrize("threshold", [0.0, 1.0, -0.2, 1.5])
def test_config_threshold_outside_open_interval(threshold):
    with pytest.raises(ValueError, match=rf"threshold .*{threshold}"):
        PostprocessConfig(threshold=threshold)


def test_config_threshold_not_a_number():
    with pytest.raises(TypeError, match="threshold"):
        PostprocessConfig(threshold="0.5")


@pytest.mark.parametrize(
    ("name", "value"),
    [("hole_size_px", -1), ("min_size_px", -5), ("footprint_px", 0)],
)
def test_config_negative_sizes(name, value):
    with pytest.raises(ValueError, match=rf"{name} .*{value}"):
        PostprocessConfig(**{name: value})


def test_config_size_not_integer():
    with pytest.raises(TypeError, match="min_size_px"):
        PostprocessConfig(min_size_px=20.5)


def test_config_watershed_not_bool():
    with pytest.raises(TypeError, match="watershed"):
        PostprocessConfig(watershed="yes")


# --- threshold ---


def test_threshold_is_strict():
    probability = np.full((30, 60), LOW, dtype=np.float32)
    probability[5:15, 5:15] = 0.5  # equal to the threshold: background
    probability[5:15, 40:50] = 0.51  # above the threshold: one cell
    labels = label_cells(probability, ONLY_THRESHOLD)
    assert count_cells(labels) == 1
    assert labels[10, 10] == 0
    assert labels[10, 45] == 1


def test_threshold_parameter_changes_result():
    probability = np.full((30, 60), LOW, dtype=np.float32)
    probability[5:15, 5:15] = 0.4
    probability[5:15, 40:50] = 0.8
    low = PostprocessConfig(threshold=0.3, hole_size_px=0, min_size_px=0, watershed=False)
    high = PostprocessConfig(threshold=0.6, hole_size_px=0, min_size_px=0, watershed=False)
    assert count_cells(label_cells(probability, low)) == 2
    assert count_cells(label_cells(probability, high)) == 1


# --- hole filling ---


def square_with_hole(hole_height: int, hole_width: int) -> np.ndarray:
    """Return a 40x40 mask with a 30x30 square that has a centred rectangular hole."""
    mask = np.zeros((40, 40), dtype=bool)
    mask[5:35, 5:35] = True
    top = 20 - hole_height // 2
    left = 20 - hole_width // 2
    mask[top : top + hole_height, left : left + hole_width] = False
    return mask


def test_hole_under_limit_filled():
    # A 7x7 hole has 49 px, below hole_size_px = 50, so the cell becomes the full 30x30 square.
    mask = square_with_hole(7, 7)
    config = PostprocessConfig(hole_size_px=50, min_size_px=0, watershed=False)
    labels = label_cells(probability_from(mask), config)
    assert np.count_nonzero(labels) == 30 * 30
    assert labels[20, 20] == 1


def test_hole_at_limit_kept():
    # A 5x10 hole has exactly 50 px, which is not smaller than 50, so it stays open.
    mask = square_with_hole(5, 10)
    config = PostprocessConfig(hole_size_px=50, min_size_px=0, watershed=False)
    labels = label_cells(probability_from(mask), config)
    assert np.count_nonzero(labels) == 30 * 30 - 50
    assert labels[20, 20] == 0


def test_hole_over_limit_kept():
    # An 8x8 hole has 64 px, above the limit.
    mask = square_with_hole(8, 8)
    config = PostprocessConfig(hole_size_px=50, min_size_px=0, watershed=False)
    labels = label_cells(probability_from(mask), config)
    assert np.count_nonzero(labels) == 30 * 30 - 64
    assert labels[20, 20] == 0


def test_hole_filling_disabled_by_zero():
    mask = square_with_hole(3, 3)
    filled = fill_small_holes(mask, 0)
    assert np.array_equal(filled, mask)
    assert filled is not mask


def test_notch_open_to_border_not_filled():
    # The 7x4 = 28 px notch touches the top edge, so it is background, not a hole.
    mask = np.zeros((20, 20), dtype=bool)
    mask[0:10, 0:10] = True
    mask[0:7, 3:7] = False
    filled = fill_small_holes(mask, 50)
    assert np.array_equal(filled, mask)


def test_diagonal_gap_does_not_open_hole():
    # A one-pixel ring around a 3x3 hole, with the ring's corner pixel (1, 1) missing. The
    # hole touches the outside only diagonally, through (1, 1) and (2, 2). Holes are
    # 4-connected because cells are 8-connected, so the hole is enclosed and filled.
    mask = np.zeros((7, 7), dtype=bool)
    mask[1:6, 1:6] = True
    mask[2:5, 2:5] = False
    mask[1, 1] = False
    filled = fill_small_holes(mask, 10)
    assert filled[2:5, 2:5].all()
    assert not filled[1, 1]


# --- small-object removal ---


def test_small_objects_removed_below_limit():
    mask = np.zeros((40, 80), dtype=bool)
    mask[5:15, 5:25] = True  # 10 x 20 = 200 px: kept
    mask[20:30, 40:60] = True
    mask[20, 40] = False  # 200 - 1 = 199 px: removed
    config = PostprocessConfig(hole_size_px=0, min_size_px=200, watershed=False)
    labels = label_cells(probability_from(mask), config)
    assert count_cells(labels) == 1
    assert labels[10, 10] == 1
    assert np.count_nonzero(labels) == 200


def test_small_objects_use_8_connectivity():
    # Two 10x10 squares that touch only at one corner form one 8-connected 200 px object.
    mask = np.zeros((30, 30), dtype=bool)
    mask[0:10, 0:10] = True
    mask[10:20, 10:20] = True
    cleaned = remove_small_objects(mask, 200)
    assert np.array_equal(cleaned, mask)


def test_small_object_removal_disabled_by_zero():
    mask = np.zeros((10, 10), dtype=bool)
    mask[4, 4] = True
    config = PostprocessConfig(hole_size_px=0, min_size_px=0, watershed=False)
    assert count_cells(label_cells(probability_from(mask), config)) == 1


# --- watershed ---


def test_watershed_splits_two_touching_discs():
    # Centres 36 px apart with radius 20: the discs overlap and form one component.
    mask = disc((100, 140), (50, 50), 20) | disc((100, 140), (50, 86), 20)
    probability = probability_from(mask)
    labels = label_cells(probability, PostprocessConfig())
    assert count_cells(labels) == 2
    assert labels[50, 50] != labels[50, 86]
    assert labels[50, 50] > 0
    assert labels[50, 86] > 0
    assert np.count_nonzero(labels) == np.count_nonzero(mask)


def test_watershed_disabled_keeps_touching_discs_together():
    mask = disc((100, 140), (50, 50), 20) | disc((100, 140), (50, 86), 20)
    config = PostprocessConfig(watershed=False)
    assert count_cells(label_cells(probability_from(mask), config)) == 1


def test_watershed_keeps_one_disc_whole():
    mask = disc((100, 140), (50, 60), 20)
    labels = label_cells(probability_from(mask), PostprocessConfig())
    assert count_cells(labels) == 1
    assert np.count_nonzero(labels) == np.count_nonzero(mask)


def test_watershed_keeps_disc_on_border():
    # Half a disc cut by the top edge has its distance maximum on the border row.
    mask = disc((100, 140), (0, 60), 20)
    labels = label_cells(probability_from(mask), PostprocessConfig())
    assert count_cells(labels) == 1
    assert np.count_nonzero(labels) == np.count_nonzero(mask)


def test_watershed_footprint_controls_split():
    # Discs of radius 20 and 17, centres 34 px apart. A 40 px window around each centre
    # contains only that disc's distance maximum. An 80 px window contains both centres, so
    # only the larger disc keeps a maximum.
    mask = disc((100, 140), (50, 50), 20) | disc((100, 140), (50, 84), 17)
    probability = probability_from(mask)
    assert count_cells(label_cells(probability, PostprocessConfig(footprint_px=40))) == 2
    assert count_cells(label_cells(probability, PostprocessConfig(footprint_px=80))) == 1


# --- relabelling ---


def test_labels_consecutive_int32():
    mask = np.zeros((30, 90), dtype=bool)
    for left in (5, 35, 65):
        mask[5:25, left : left + 20] = True
    labels = label_cells(probability_from(mask), PostprocessConfig())
    assert labels.dtype == np.int32
    assert labels.shape == mask.shape
    assert set(np.unique(labels).tolist()) == {0, 1, 2, 3}


def test_relabel_consecutive_keeps_order():
    labels = np.array([[0, 5, 5], [9, 0, 2]], dtype=np.int64)
    expected = np.array([[0, 2, 2], [3, 0, 1]], dtype=np.int32)
    relabelled = relabel_consecutive(labels)
    assert relabelled.dtype == np.int32
    assert np.array_equal(relabelled, expected)


def test_label_cells_empty_map():
    labels = label_cells(np.zeros((20, 30), dtype=np.float32), PostprocessConfig())
    assert labels.dtype == np.int32
    assert count_cells(labels) == 0


# --- input checks ---


def test_label_cells_rejects_integer_map():
    with pytest.raises(TypeError, match="uint8"):
        label_cells(np.zeros((5, 5), dtype=np.uint8), PostprocessConfig())


def test_label_cells_rejects_values_above_one():
    probability = np.zeros((5, 5), dtype=np.float32)
    probability[0, 0] = 3.0
    with pytest.raises(ValueError, match=r"\[0.0, 3.0\]"):
        label_cells(probability, PostprocessConfig())


def test_label_cells_rejects_nan():
    probability = np.zeros((5, 5), dtype=np.float32)
    probability[1, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        label_cells(probability, PostprocessConfig())


def test_label_cells_rejects_3d_map():
    with pytest.raises(TypeError, match=r"\(5, 5, 3\)"):
        label_cells(np.zeros((5, 5, 3), dtype=np.float32), PostprocessConfig())


def test_label_cells_rejects_dict_config():
    with pytest.raises(TypeError, match="PostprocessConfig"):
        label_cells(np.zeros((5, 5), dtype=np.float32), {"threshold": 0.5})


# --- measure_cells and count_cells ---


def test_measure_cells_known_disc_and_rectangle():
    labels = np.zeros((64, 80), dtype=np.int32)
    probability = np.full(labels.shape, 0.2, dtype=np.float32)

    # Disc of radius 10 centred at row 30, col 40, labelled 3.
    inside = disc(labels.shape, (30, 40), 10)
    labels[inside] = 3
    probability[inside] = 0.7
    probability[inside & (np.indices(labels.shape)[1] == 40)] = 0.9  # its centre column

    # Rectangle of rows 2..5 and cols 3..7 (4 x 5 px), labelled 7, probability 0.6.
    labels[2:6, 3:8] = 7
    probability[2:6, 3:8] = 0.6

    table = measure_cells(labels, probability)
    assert list(table.columns) == list(MEASURE_COLUMNS)
    assert table["cell_id"].tolist() == [3, 7]
    disc_row = table.iloc[0]
    rect_row = table.iloc[1]

    # Pixels with dy^2 + dx^2 <= 100, row by row: half-widths floor(sqrt(100 - dy^2)) for
    # dy = 0..10 are 10, 9, 9, 9, 9, 8, 8, 7, 6, 4, 0, giving widths 21, 19, 19, 19, 19,
    # 17, 17, 15, 13, 9, 1. Total: 21 + 2 * (4 * 19 + 2 * 17 + 15 + 13 + 9 + 1) = 317.
    disc_area = 21 + 2 * (4 * 19 + 2 * 17 + 15 + 13 + 9 + 1)
    assert disc_area == 317
    assert disc_row["area_px"] == disc_area
    # The disc is symmetric about its centre pixel.
    assert disc_row["centroid_x"] == pytest.approx(40.0)
    assert disc_row["centroid_y"] == pytest.approx(30.0)
    assert disc_row["equivalent_diameter_px"] == pytest.approx(math.sqrt(4 * 317 / math.pi))
    # The centre column contains 21 pixels at 0.9 and the other 296 are at 0.7.
    assert disc_row["mean_probability"] == pytest.approx((21 * 0.9 + 296 * 0.7) / 317, rel=1e-6)

    assert rect_row["area_px"] == 20
    assert rect_row["centroid_x"] == pytest.approx((3 + 7) / 2)
    assert rect_row["centroid_y"] == pytest.approx((2 + 5) / 2)
    assert rect_row["equivalent_diameter_px"] == pytest.approx(math.sqrt(4 * 20 / math.pi))
    assert rect_row["mean_probability"] == pytest.approx(0.6, rel=1e-6)


def test_measure_cells_disc_diameter():
    labels = disc((64, 64), (32, 32), 10).astype(np.int32)
    table = measure_cells(labels, np.zeros(labels.shape, dtype=np.float32))
    assert table["equivalent_diameter_px"].iloc[0] == pytest.approx(20.0, abs=0.2)


def test_measure_cells_no_cells():
    table = measure_cells(np.zeros((8, 8), dtype=np.int32), np.zeros((8, 8), dtype=np.float32))
    assert isinstance(table, pd.DataFrame)
    assert list(table.columns) == list(MEASURE_COLUMNS)
    assert len(table) == 0


def test_measure_cells_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(8, 8\) and \(8, 9\)"):
        measure_cells(np.zeros((8, 8), dtype=np.int32), np.zeros((8, 9), dtype=np.float32))


def test_measure_cells_rejects_bool_labels():
    with pytest.raises(TypeError, match="label_mask"):
        measure_cells(np.zeros((8, 8), dtype=bool), np.zeros((8, 8), dtype=np.float32))


def test_count_cells_non_consecutive_labels():
    labels = np.array([[0, 3, 3], [8, 0, 0]], dtype=np.int32)
    assert count_cells(labels) == 2
    assert isinstance(count_cells(labels), int)


def test_count_cells_rejects_negative_labels():
    with pytest.raises(ValueError, match="-1"):
        count_cells(np.array([[0, -1]], dtype=np.int32))
