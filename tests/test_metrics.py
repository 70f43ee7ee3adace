"""Tests of ccflow.metrics on small hand-made label images with worked-out values."""

import math

import numpy as np
import pytest

from ccflow.metrics import (
    image_metrics,
    iou_matrix,
    label_mask,
    match_by_centroid,
    match_by_iou,
    per_image_table,
    pooled_metrics,
)

IMAGE_METRIC_KEYS = {
    "true_count",
    "pred_count",
    "det_tp",
    "det_fp",
    "det_fn",
    "det_precision",
    "det_recall",
    "det_f1",
    "seg_tp",
    "seg_fp",
    "seg_fn",
    "seg_precision",
    "seg_recall",
    "seg_f1",
}


def square_labels(shape: tuple[int, int], cells: dict[int, tuple[int, int]]) -> np.ndarray:
    """Return int32 labels with a 5x5 square per cell, keyed by label and centred at (row, col)."""
    labels = np.zeros(shape, dtype=np.int32)
    for label, (row, col) in cells.items():
        labels[row - 2 : row + 3, col - 2 : col + 3] = label
    return labels


# --- label_mask ---


def test_label_mask_8_connectivity():
    mask = np.zeros((6, 6), dtype=bool)
    mask[0, 0] = mask[1, 1] = True  # diagonal neighbours: one cell
    mask[4, 4] = True  # separate cell
    labels = label_mask(mask)
    assert labels.dtype == np.int32
    assert labels[0, 0] == labels[1, 1] == 1
    assert labels[4, 4] == 2
    assert labels.max() == 2


def test_label_mask_rejects_integer_mask():
    with pytest.raises(TypeError, match="mask > 0"):
        label_mask(np.zeros((4, 4), dtype=np.uint8))


# --- detection matching ---


def test_centroid_prediction_between_two_cells_matches_one():
    # True cells at columns 20 and 60, prediction at column 40: 20 px from each, both
    # under 40 px, but one prediction can only match one true cell.
    true = square_labels((40, 80), {1: (20, 20), 2: (20, 60)})
    pred = square_labels((40, 80), {1: (20, 40)})
    result = match_by_centroid(true, pred)
    assert result.tp == 1
    assert result.fp == 0
    assert result.fn == 1
    assert len(result.pairs) == 1


def test_centroid_far_prediction_is_false_positive():
    # Prediction 5 near true cell 1: distance sqrt(2^2 + 4^2) = 4.5 px. Prediction 6 is
    # 80 px away from it and from everything else.
    true = square_labels((40, 120), {1: (20, 20)})
    pred = square_labels((40, 120), {5: (22, 24), 6: (20, 100)})
    result = match_by_centroid(true, pred)
    assert result.pairs == [(1, 5)]
    assert result.tp == 1
    assert result.fp == 1
    assert result.fn == 0


def test_centroid_distance_limit_is_strict():
    true = square_labels((40, 80), {1: (20, 20)})
    at_limit = square_labels((40, 80), {1: (20, 60)})  # 60 - 20 = 40 px: no match
    inside = square_labels((40, 80), {1: (20, 59)})  # 59 - 20 = 39 px: match
    assert match_by_centroid(true, at_limit).tp == 0
    assert match_by_centroid(true, inside).tp == 1


def test_centroid_max_distance_parameter():
    true = square_labels((40, 80), {1: (20, 20)})
    pred = square_labels((40, 80), {1: (20, 45)})  # 25 px apart
    assert match_by_centroid(true, pred, max_distance=30.0).tp == 1
    assert match_by_centroid(true, pred, max_distance=20.0).tp == 0


def test_centroid_matching_maximises_matches():
    # True cells A (col 20) and B (col 60). P1 (col 34) is 14 px from A and 26 from B,
    # P2 (col 4) is 16 px from A and 56 from B. Pairing each prediction with its nearest
    # cell first would give P1-A and leave P2 unmatched. The one-to-one optimum is
    # P2-A and P1-B: two matches.
    true = square_labels((40, 80), {1: (20, 20), 2: (20, 60)})
    pred = square_labels((40, 80), {1: (20, 34), 2: (20, 4)})
    result = match_by_centroid(true, pred)
    assert result.pairs == [(1, 2), (2, 1)]
    assert result.tp == 2
    assert result.fp == 0
    assert result.fn == 0


def test_centroid_matching_prefers_shorter_total_distance():
    # Both pairings match two cells. A-P1 + B-P2 costs 2 + 2 px, the swap 20 + 20 px.
    true = square_labels((40, 80), {1: (20, 20), 2: (20, 38)})
    pred = square_labels((40, 80), {1: (20, 18), 2: (20, 40)})
    assert match_by_centroid(true, pred).pairs == [(1, 1), (2, 2)]


def test_centroid_of_irregular_cell():
    # An L-shaped cell: pixels (0, 0), (1, 0), (2, 0), (2, 1), (2, 2). Its centroid is
    # row (0 + 1 + 2 + 2 + 2) / 5 = 1.4, col (0 + 0 + 0 + 1 + 2) / 5 = 0.6.
    true = np.zeros((50, 50), dtype=np.int32)
    true[0:3, 0] = 1
    true[2, 0:3] = 1
    # A single-pixel prediction at (1, 40) is sqrt(0.4^2 + 39.4^2) = 39.40 px away: match.
    pred = np.zeros((50, 50), dtype=np.int32)
    pred[1, 40] = 1
    assert math.hypot(1.4 - 1, 0.6 - 40) < 40
    assert match_by_centroid(true, pred).tp == 1
    # At (1, 41) it is sqrt(0.4^2 + 40.4^2) = 40.40 px away: no match.
    pred[1, 40] = 0
    pred[1, 41] = 1
    assert math.hypot(1.4 - 1, 0.6 - 41) > 40
    assert match_by_centroid(true, pred).tp == 0


# --- segmentation matching ---


def strip_labels(width: int, start: int, stop: int) -> np.ndarray:
    """Return a 1 x width label row with label 1 on columns start..stop-1."""
    labels = np.zeros((1, width), dtype=np.int32)
    labels[0, start:stop] = 1
    return labels


def test_iou_exactly_at_limit_does_not_match():
    # True cell: columns 0..4 (5 px). Prediction: columns 1..9 (9 px).
    # Intersection columns 1..4 = 4 px, union columns 0..9 = 10 px, IoU = 4 / 10 = 0.4.
    true = strip_labels(12, 0, 5)
    pred = strip_labels(12, 1, 10)
    assert iou_matrix(true, pred)[0, 0] == 0.4
    result = match_by_iou(true, pred, min_iou=0.4)
    assert result.tp == 0
    assert result.fp == 1
    assert result.fn == 1


def test_iou_just_above_limit_matches():
    # Prediction columns 1..8 (8 px): intersection 4, union 9, IoU = 4 / 9 = 0.444.
    true = strip_labels(12, 0, 5)
    pred = strip_labels(12, 1, 9)
    assert iou_matrix(true, pred)[0, 0] == pytest.approx(4 / 9)
    result = match_by_iou(true, pred, min_iou=0.4)
    assert result.pairs == [(1, 1)]
    assert result.tp == 1


def test_iou_one_prediction_covering_two_cells_matches_one():
    # Two true cells of 10 px each; one 20 px prediction covers both exactly.
    # IoU with each = 10 / 20 = 0.5 > 0.4, but only one pair can be kept.
    true = np.zeros((1, 20), dtype=np.int32)
    true[0, 0:10] = 1
    true[0, 10:20] = 2
    pred = np.ones((1, 20), dtype=np.int32)
    assert np.allclose(iou_matrix(true, pred), [[0.5], [0.5]])
    result = match_by_iou(true, pred)
    assert result.tp == 1
    assert result.fp == 0
    assert result.fn == 1


def test_iou_matrix_values():
    # True 1: cols 0..3 (4 px); true 2: cols 6..9 (4 px).
    # Pred 4: cols 2..7 (6 px) overlaps true 1 on cols 2..3 (2 px) and true 2 on 6..7 (2 px).
    # Pred 9: cols 8..11 (4 px) overlaps true 2 on cols 8..9 (2 px).
    true = np.zeros((1, 12), dtype=np.int32)
    true[0, 0:4] = 1
    true[0, 6:10] = 2
    pred = np.zeros((1, 12), dtype=np.int32)
    pred[0, 2:8] = 4
    pred[0, 8:12] = 9
    expected = np.array(
        [
            [2 / (4 + 6 - 2), 0 / (4 + 4 - 0)],
            [2 / (4 + 6 - 2), 2 / (4 + 4 - 2)],
        ]
    )
    assert np.allclose(iou_matrix(true, pred), expected)


# --- image_metrics ---


def test_image_metrics_worked_example():
    # True cells 1, 2, 3 (25 px squares). Predictions:
    #   10: same square as cell 1 -> detection and segmentation match (IoU 1).
    #   11: cell 2 shifted 3 px right -> centroid 3 px away, IoU 10 / 40 = 0.25: detection
    #       match only. The squares share 5 rows x 2 columns = 10 px, union 25 + 25 - 10.
    #   12: far from everything -> false positive in both.
    # Cell 3 is missed.
    true = square_labels((60, 120), {1: (10, 10), 2: (10, 50), 3: (45, 100)})
    pred = square_labels((60, 120), {10: (10, 10), 11: (10, 53), 12: (45, 20)})
    assert iou_matrix(true, pred)[1, 1] == pytest.approx(10 / (25 + 25 - 10))

    row = image_metrics(true, pred)
    assert set(row) == IMAGE_METRIC_KEYS
    assert row["true_count"] == 3
    assert row["pred_count"] == 3
    assert (row["det_tp"], row["det_fp"], row["det_fn"]) == (2, 1, 1)
    assert row["det_precision"] == pytest.approx(2 / 3)
    assert row["det_recall"] == pytest.approx(2 / 3)
    assert row["det_f1"] == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
    assert (row["seg_tp"], row["seg_fp"], row["seg_fn"]) == (1, 2, 2)
    assert row["seg_precision"] == pytest.approx(1 / 3)
    assert row["seg_recall"] == pytest.approx(1 / 3)
    assert row["seg_f1"] == pytest.approx(2 * 1 / (2 * 1 + 2 + 2))


def test_image_metrics_unequal_precision_recall():
    # 4 true cells, 2 predictions on cells 1 and 2: tp 2, fp 0, fn 2.
    # Precision 2 / 2 = 1, recall 2 / 4 = 0.5, F1 = 4 / (4 + 0 + 2) = 2 / 3.
    true = square_labels((20, 100), {1: (10, 10), 2: (10, 30), 3: (10, 50), 4: (10, 70)})
    pred = square_labels((20, 100), {1: (10, 10), 2: (10, 30)})
    row = image_metrics(true, pred)
    assert row["det_precision"] == 1.0
    assert row["det_recall"] == 0.5
    assert row["det_f1"] == pytest.approx(2 / 3)


def test_image_metrics_both_empty():
    empty = np.zeros((10, 10), dtype=np.int32)
    row = image_metrics(empty, empty)
    assert row["true_count"] == 0
    assert row["pred_count"] == 0
    for prefix in ("det", "seg"):
        assert (row[f"{prefix}_tp"], row[f"{prefix}_fp"], row[f"{prefix}_fn"]) == (0, 0, 0)
        assert row[f"{prefix}_precision"] == 1.0
        assert row[f"{prefix}_recall"] == 1.0
        assert row[f"{prefix}_f1"] == 1.0


def test_image_metrics_no_predictions():
    true = square_labels((20, 40), {1: (10, 10), 2: (10, 30)})
    row = image_metrics(true, np.zeros_like(true))
    assert (row["det_tp"], row["det_fp"], row["det_fn"]) == (0, 0, 2)
    assert row["det_precision"] == 0.0  # 0 / 0, defined as 0 when true cells exist
    assert row["det_recall"] == 0.0
    assert row["det_f1"] == 0.0


def test_image_metrics_no_true_cells():
    pred = square_labels((20, 40), {1: (10, 10)})
    row = image_metrics(np.zeros_like(pred), pred)
    assert (row["det_tp"], row["det_fp"], row["det_fn"]) == (0, 1, 0)
    assert row["det_precision"] == 0.0
    assert row["det_recall"] == 0.0  # 0 / 0, defined as 0 when predictions exist
    assert row["det_f1"] == 0.0
    assert row["seg_fp"] == 1


def test_image_metrics_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(10, 10\) and \(10, 12\)"):
        image_metrics(np.zeros((10, 10), dtype=np.int32), np.zeros((10, 12), dtype=np.int32))


def test_image_metrics_rejects_bool_labels():
    with pytest.raises(TypeError, match="label_mask"):
        image_metrics(np.zeros((4, 4), dtype=bool), np.zeros((4, 4), dtype=np.int32))


def test_image_metrics_rejects_negative_labels():
    pred = np.zeros((4, 4), dtype=np.int32)
    pred[0, 0] = -3
    with pytest.raises(ValueError, match="pred_labels .*-3"):
        image_metrics(np.zeros((4, 4), dtype=np.int32), pred)


@pytest.mark.parametrize("max_distance", [0.0, -1.0, math.inf, math.nan])
def test_match_by_centroid_invalid_distance(max_distance):
    labels = np.zeros((4, 4), dtype=np.int32)
    with pytest.raises(ValueError, match="max_distance"):
        match_by_centroid(labels, labels, max_distance=max_distance)


@pytest.mark.parametrize("min_iou", [1.0, -0.1, 2.0])
def test_match_by_iou_invalid_limit(min_iou):
    labels = np.zeros((4, 4), dtype=np.int32)
    with pytest.raises(ValueError, match="min_iou"):
        match_by_iou(labels, labels, min_iou=min_iou)


# --- pooled_metrics ---


def make_row(true_count, pred_count, det, seg):
    """Return an image_metrics-like row from counts and (tp, fp, fn) tuples."""
    return {
        "true_count": true_count,
        "pred_count": pred_count,
        "det_tp": det[0],
        "det_fp": det[1],
        "det_fn": det[2],
        "seg_tp": seg[0],
        "seg_fp": seg[1],
        "seg_fn": seg[2],
    }


def test_pooled_metrics_worked_example():
    rows = [
        make_row(10, 12, det=(9, 3, 1), seg=(8, 4, 2)),
        make_row(4, 2, det=(2, 0, 2), seg=(1, 1, 3)),
        make_row(0, 3, det=(0, 3, 0), seg=(0, 3, 0)),  # no true cells
    ]
    pooled = pooled_metrics(rows)

    # Detection sums: tp 9 + 2 + 0 = 11, fp 3 + 0 + 3 = 6, fn 1 + 2 + 0 = 3.
    assert (pooled["det_tp"], pooled["det_fp"], pooled["det_fn"]) == (11, 6, 3)
    assert pooled["det_precision"] == pytest.approx(11 / 17)
    assert pooled["det_recall"] == pytest.approx(11 / 14)
    assert pooled["det_f1"] == pytest.approx(22 / (22 + 6 + 3))
    # Segmentation sums: tp 9, fp 8, fn 5.
    assert (pooled["seg_tp"], pooled["seg_fp"], pooled["seg_fn"]) == (9, 8, 5)
    assert pooled["seg_precision"] == pytest.approx(9 / 17)
    assert pooled["seg_recall"] == pytest.approx(9 / 14)
    assert pooled["seg_f1"] == pytest.approx(18 / (18 + 8 + 5))

    # Count errors pred - true: +2, -2, +3. MAE and median over all three images.
    assert pooled["count_mae"] == pytest.approx((2 + 2 + 3) / 3)
    assert pooled["count_median_ae"] == 2.0
    # MAPE and MPE over the two images with cells: 2 / 10 = 20 %, -2 / 4 = -50 %.
    assert pooled["count_mape"] == pytest.approx((20 + 50) / 2)
    assert pooled["count_mpe"] == pytest.approx((20 - 50) / 2)

    assert pooled["n_images"] == 3
    assert pooled["n_images_no_cells"] == 1
    assert pooled["false_count_no_cells"] == 3
    assert pooled["true_count"] == 14
    assert pooled["pred_count"] == 17


def test_pooled_metrics_only_images_without_cells():
    rows = [
        make_row(0, 0, det=(0, 0, 0), seg=(0, 0, 0)),
        make_row(0, 2, det=(0, 2, 0), seg=(0, 2, 0)),
    ]
    pooled = pooled_metrics(rows)
    assert math.isnan(pooled["count_mape"])
    assert math.isnan(pooled["count_mpe"])
    assert pooled["n_images_no_cells"] == 2
    assert pooled["false_count_no_cells"] == 2
    assert pooled["count_mae"] == pytest.approx((0 + 2) / 2)
    assert pooled["det_precision"] == 0.0
    assert pooled["det_f1"] == 0.0


def test_pooled_metrics_all_empty_images_score_one():
    empty = np.zeros((8, 8), dtype=np.int32)
    pooled = pooled_metrics([image_metrics(empty, empty)])
    assert pooled["det_f1"] == 1.0
    assert pooled["seg_f1"] == 1.0
    assert pooled["count_mae"] == 0.0


def test_pooled_metrics_from_image_metrics():
    true = square_labels((20, 40), {1: (10, 10), 2: (10, 30)})
    pred = square_labels((20, 40), {1: (10, 10)})
    rows = [image_metrics(true, pred), image_metrics(true, true)]
    pooled = pooled_metrics(rows)
    # tp 1 + 2, fp 0, fn 1 + 0. Count errors -1 and 0: MAPE (50 + 0) / 2 = 25 %.
    assert pooled["det_f1"] == pytest.approx(2 * 3 / (2 * 3 + 0 + 1))
    assert pooled["count_mape"] == pytest.approx(25.0)
    assert pooled["count_mpe"] == pytest.approx(-25.0)


def test_pooled_metrics_empty_rows():
    with pytest.raises(ValueError, match="rows is empty"):
        pooled_metrics([])


def test_pooled_metrics_missing_key():
    row = make_row(1, 1, det=(1, 0, 0), seg=(1, 0, 0))
    del row["seg_fn"]
    with pytest.raises(ValueError, match=r"row 0 .*seg_fn"):
        pooled_metrics([row])


# --- per_image_table ---


def test_per_image_table_columns():
    rows = [
        make_row(10, 12, det=(9, 3, 1), seg=(8, 4, 2)),
        make_row(4, 2, det=(2, 0, 2), seg=(1, 1, 3)),
    ]
    table = per_image_table(["a", "b"], rows)
    assert list(table.columns[:3]) == ["name", "true_count", "pred_count"]
    assert table["name"].tolist() == ["a", "b"]
    assert table["count_error"].tolist() == [2, -2]
    assert table["det_tp"].tolist() == [9, 2]


def test_per_image_table_length_mismatch():
    with pytest.raises(ValueError, match="2 names and 1 rows"):
        per_image_table(["a", "b"], [make_row(1, 1, det=(1, 0, 0), seg=(1, 0, 0))])
