"""Detection, segmentation and counting metrics for label images.

True and predicted cells are paired one to one with the Hungarian algorithm
(:func:`scipy.optimize.linear_sum_assignment`), so one prediction never counts for two
true cells. A pair is allowed only when it meets the criterion:

- detection: the centroids are strictly closer than ``max_distance`` pixels;
- segmentation: the intersection over union (IoU) is strictly greater than ``min_iou``.

Among the allowed pairs the assignment first maximises the number of matches, then
minimises the total distance (detection) or the total ``1 - IoU`` (segmentation).

Label images are integer (H, W) arrays with 0 = background. Labels need not be
consecutive.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.optimize import linear_sum_assignment
from scipy.spatial.distance import cdist

from ccflow.postprocess import validate_labels

logger = logging.getLogger(__name__)

EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# Keys that pooled_metrics reads from every per-image row.
ROW_COUNT_KEYS = (
    "true_count",
    "pred_count",
    "det_tp",
    "det_fp",
    "det_fn",
    "seg_tp",
    "seg_fp",
    "seg_fn",
)


class MatchResult(NamedTuple):
    """One-to-one matching of true and predicted cells.

    Attributes
    ----------
    pairs : list of tuple of int
        Matched ``(true_id, pred_id)`` label pairs, sorted by ``true_id``.
    tp : int
        Number of matched pairs.
    fp : int
        Predicted cells left unmatched.
    fn : int
        True cells left unmatched.
    """

    pairs: list[tuple[int, int]]
    tp: int
    fp: int
    fn: int


def _check_label_pair(true_labels: np.ndarray, pred_labels: np.ndarray) -> None:
    validate_labels(true_labels, "true_labels")
    validate_labels(pred_labels, "pred_labels")
    if true_labels.shape != pred_labels.shape:
        raise ValueError(
            f"true_labels and pred_labels must have the same shape, got {true_labels.shape} "
            f"and {pred_labels.shape}; resize the prediction to the size of the true mask"
        )


def _check_max_distance(max_distance: float) -> None:
    if not (isinstance(max_distance, (int, float, np.number)) and max_distance > 0):
        raise ValueError(f"max_distance must be a positive number of pixels, got {max_distance!r}")
    if not math.isfinite(max_distance):
        raise ValueError(f"max_distance must be finite, got {max_distance!r}")


def _check_min_iou(min_iou: float) -> None:
    if not (isinstance(min_iou, (int, float, np.number)) and 0.0 <= min_iou < 1.0):
        raise ValueError(f"min_iou must lie in [0, 1), got {min_iou!r}; the usual value is 0.4")


def label_mask(mask: np.ndarray) -> np.ndarray:
    """Label the 8-connected components of a bool mask.

    Parameters
    ----------
    mask : numpy.ndarray
        bool (H, W), True = cell.

    Returns
    -------
    numpy.ndarray
        int32 (H, W) labels, 0 = background, components numbered 1..N in raster order.
    """
    if not isinstance(mask, np.ndarray) or mask.dtype != bool or mask.ndim != 2:
        raise TypeError(
            f"mask must be a 2-D bool array (H, W), got dtype "
            f"{getattr(mask, 'dtype', type(mask).__name__)} and shape "
            f"{getattr(mask, 'shape', None)}; convert with `mask > 0`"
        )
    labels, _ = ndimage.label(mask, structure=EIGHT_CONNECTED)
    return labels.astype(np.int32)


def _dense_index(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the non-zero label ids and an index image with 0 = background, 1..N = ids."""
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(labels.shape, dtype=np.int64)
    max_label = int(labels.max())
    if max_label > 4 * labels.size:
        # Sparse label values: sorting is cheaper than a lookup table of max_label entries.
        ids, inverse = np.unique(labels, return_inverse=True)
        inverse = inverse.reshape(labels.shape)
        if ids[0] == 0:
            return ids[1:], inverse
        return ids, inverse + 1

    present = np.bincount(labels.ravel(), minlength=max_label + 1) > 0
    present[0] = False
    ids = np.flatnonzero(present)
    lookup = np.zeros(max_label + 1, dtype=np.int64)
    lookup[ids] = np.arange(1, ids.size + 1)
    return ids, lookup[labels]


def _centroids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Return the non-zero label ids and their (row, col) centroids in pixels, shape (N, 2)."""
    ids, index = _dense_index(labels)
    n_bins = ids.size + 1
    rows, cols = np.indices(labels.shape)
    area = np.bincount(index.ravel(), minlength=n_bins)[1:]
    sum_rows = np.bincount(index.ravel(), weights=rows.ravel(), minlength=n_bins)[1:]
    sum_cols = np.bincount(index.ravel(), weights=cols.ravel(), minlength=n_bins)[1:]
    return ids, np.column_stack([sum_rows / area, sum_cols / area])


def _assign(cost: np.ndarray, allowed: np.ndarray) -> list[tuple[int, int]]:
    """Return (row, col) index pairs of a one-to-one assignment restricted to allowed pairs.

    ``cost`` must be non-negative. Each forbidden pair costs more than all allowed pairs
    together, so the minimum-cost assignment contains as many allowed pairs as possible
    and, among those, has the least total cost. Forbidden pairs are then dropped.
    """
    if not allowed.any():
        return []
    penalty = float(cost[allowed].sum()) + 1.0
    full_cost = np.where(allowed, cost, penalty)
    rows, cols = linear_sum_assignment(full_cost)
    return [(int(r), int(c)) for r, c in zip(rows, cols) if allowed[r, c]]


def _match_result(
    true_ids: np.ndarray, pred_ids: np.ndarray, index_pairs: list[tuple[int, int]]
) -> MatchResult:
    pairs = sorted((int(true_ids[r]), int(pred_ids[c])) for r, c in index_pairs)
    tp = len(pairs)
    return MatchResult(pairs=pairs, tp=tp, fp=int(pred_ids.size) - tp, fn=int(true_ids.size) - tp)


def match_by_centroid(
    true_labels: np.ndarray, pred_labels: np.ndarray, max_distance: float = 40.0
) -> MatchResult:
    """Match true and predicted cells one to one by centroid distance.

    A pair is allowed when the Euclidean distance between the two centroids is strictly
    below ``max_distance``. The Hungarian algorithm picks the largest set of allowed pairs
    and, among those, the set with the smallest total distance.

    Parameters
    ----------
    true_labels, pred_labels : numpy.ndarray
        Integer (H, W) label images of the same shape, 0 = background.
    max_distance : float
        Distance limit in pixels.

    Returns
    -------
    MatchResult
        Matched ``(true_id, pred_id)`` pairs and the tp, fp and fn counts.
    """
    _check_label_pair(true_labels, pred_labels)
    _check_max_distance(max_distance)
    true_ids, true_xy = _centroids(true_labels)
    pred_ids, pred_xy = _centroids(pred_labels)
    if true_ids.size == 0 or pred_ids.size == 0:
        return _match_result(true_ids, pred_ids, [])

    distance = cdist(true_xy, pred_xy)
    return _match_result(true_ids, pred_ids, _assign(distance, distance < max_distance))


def iou_matrix(true_labels: np.ndarray, pred_labels: np.ndarray) -> np.ndarray:
    """Compute the intersection over union of every pair of true and predicted cells.

    Parameters
    ----------
    true_labels, pred_labels : numpy.ndarray
        Integer (H, W) label images of the same shape, 0 = background.

    Returns
    -------
    numpy.ndarray
        float64 (n_true, n_pred). Rows follow the sorted non-zero true labels and columns
        the sorted non-zero predicted labels.
    """
    _check_label_pair(true_labels, pred_labels)
    true_ids, true_index = _dense_index(true_labels)
    pred_ids, pred_index = _dense_index(pred_labels)
    n_true, n_pred = true_ids.size, pred_ids.size

    # Count pixels of every (true, pred) index combination, background index 0 included.
    joint = true_index.ravel().astype(np.int64) * (n_pred + 1) + pred_index.ravel()
    counts = np.bincount(joint, minlength=(n_true + 1) * (n_pred + 1))
    counts = counts.reshape(n_true + 1, n_pred + 1)
    intersection = counts[1:, 1:].astype(np.float64)
    true_area = counts[1:, :].sum(axis=1).astype(np.float64)
    pred_area = counts[:, 1:].sum(axis=0).astype(np.float64)
    union = true_area[:, None] + pred_area[None, :] - intersection
    return intersection / union


def match_by_iou(
    true_labels: np.ndarray, pred_labels: np.ndarray, min_iou: float = 0.4
) -> MatchResult:
    """Match true and predicted cells one to one by intersection over union.

    A pair is allowed when its IoU is strictly greater than ``min_iou``. The Hungarian
    algorithm picks the largest set of allowed pairs and, among those, the set with the
    largest total IoU. With ``min_iou >= 0.5`` each cell can overlap at most one partner
    that much, and the matching equals the plain threshold test.

    Parameters
    ----------
    true_labels, pred_labels : numpy.ndarray
        Integer (H, W) label images of the same shape, 0 = background.
    min_iou : float
        IoU limit in [0, 1).

    Returns
    -------
    MatchResult
        Matched ``(true_id, pred_id)`` pairs and the tp, fp and fn counts.
    """
    _check_label_pair(true_labels, pred_labels)
    _check_min_iou(min_iou)
    true_ids, _ = _dense_index(true_labels)
    pred_ids, _ = _dense_index(pred_labels)
    if true_ids.size == 0 or pred_ids.size == 0:
        return _match_result(true_ids, pred_ids, [])

    iou = iou_matrix(true_labels, pred_labels)
    return _match_result(true_ids, pred_ids, _assign(1.0 - iou, iou > min_iou))


def _ratios(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """Return precision, recall and F1, with the empty-case conventions of image_metrics."""
    if tp + fp + fn == 0:
        return 1.0, 1.0, 1.0
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn)
    return precision, recall, f1


def image_metrics(
    true_labels: np.ndarray,
    pred_labels: np.ndarray,
    *,
    max_distance: float = 40.0,
    min_iou: float = 0.4,
) -> dict[str, int | float]:
    """Score one predicted label image against the true one.

    Detection uses :func:`match_by_centroid` and segmentation :func:`match_by_iou`.
    Precision is tp / (tp + fp), recall tp / (tp + fn) and F1 2 tp / (2 tp + fp + fn).

    Empty cases: when the image has no true and no predicted cells, precision, recall and
    F1 are 1.0. Otherwise a ratio whose denominator is 0 is 0.0. So an image with true
    cells and no predictions has precision 0.0, and an image with predictions and no true
    cells has recall 0.0. F1 is 0.0 in both cases.

    Parameters
    ----------
    true_labels, pred_labels : numpy.ndarray
        Integer (H, W) label images of the same shape, 0 = background. Label a bool mask
        with :func:`label_mask` first.
    max_distance : float
        Detection limit on the centroid distance, in pixels (strictly below).
    min_iou : float
        Segmentation limit on the IoU (strictly above).

    Returns
    -------
    dict
        ``true_count``, ``pred_count``, ``det_tp``, ``det_fp``, ``det_fn`` (int),
        ``det_precision``, ``det_recall``, ``det_f1`` (float), and the same six
        ``seg_*`` keys for segmentation.
    """
    detection = match_by_centroid(true_labels, pred_labels, max_distance)
    segmentation = match_by_iou(true_labels, pred_labels, min_iou)
    det_precision, det_recall, det_f1 = _ratios(detection.tp, detection.fp, detection.fn)
    seg_precision, seg_recall, seg_f1 = _ratios(segmentation.tp, segmentation.fp, segmentation.fn)
    return {
        "true_count": detection.tp + detection.fn,
        "pred_count": detection.tp + detection.fp,
        "det_tp": detection.tp,
        "det_fp": detection.fp,
        "det_fn": detection.fn,
        "det_precision": det_precision,
        "det_recall": det_recall,
        "det_f1": det_f1,
        "seg_tp": segmentation.tp,
        "seg_fp": segmentation.fp,
        "seg_fn": segmentation.fn,
        "seg_precision": seg_precision,
        "seg_recall": seg_recall,
        "seg_f1": seg_f1,
    }


def pooled_metrics(rows: Sequence[dict[str, int | float]]) -> dict[str, int | float]:
    """Pool the per-image results of :func:`image_metrics` over a set of images.

    Detection and segmentation precision, recall and F1 come from the summed tp, fp and
    fn, with the same empty-case conventions as :func:`image_metrics`.

    The count error of an image is ``pred_count - true_count``. ``count_mae`` and
    ``count_median_ae`` are the mean and median of its absolute value over all images.
    ``count_mape`` and ``count_mpe`` are the mean of ``100 * |error| / true_count`` and of
    ``100 * error / true_count``, in percent, over the images with ``true_count > 0``
    only. They are NaN when no image has a true cell. Images without true cells are
    reported apart: ``n_images_no_cells`` counts them and ``false_count_no_cells`` sums
    their predicted counts.

    Parameters
    ----------
    rows : sequence of dict
        Outputs of :func:`image_metrics`, one per image. Extra keys are ignored.

    Returns
    -------
    dict
        ``n_images``, ``n_images_no_cells``, ``true_count``, ``pred_count``, ``det_tp``,
        ``det_fp``, ``det_fn``, ``seg_tp``, ``seg_fp``, ``seg_fn``,
        ``false_count_no_cells`` (int), and ``det_precision``, ``det_recall``,
        ``det_f1``, ``seg_precision``, ``seg_recall``, ``seg_f1``, ``count_mae``,
        ``count_median_ae``, ``count_mape``, ``count_mpe`` (float).

    Raises
    ------
    ValueError
        If ``rows`` is empty or a row lacks one of the keys of :func:`image_metrics`.
    """
    if len(rows) == 0:
        raise ValueError("rows is empty; pass one image_metrics() result per image")
    for position, row in enumerate(rows):
        missing = [key for key in ROW_COUNT_KEYS if key not in row]
        if missing:
            raise ValueError(
                f"row {position} lacks the keys {missing}; pass the dicts returned by "
                "image_metrics()"
            )

    totals = {key: int(sum(int(row[key]) for row in rows)) for key in ROW_COUNT_KEYS}
    true_counts = np.array([int(row["true_count"]) for row in rows], dtype=np.float64)
    pred_counts = np.array([int(row["pred_count"]) for row in rows], dtype=np.float64)
    errors = pred_counts - true_counts
    has_cells = true_counts > 0

    if has_cells.any():
        relative = 100.0 * errors[has_cells] / true_counts[has_cells]
        count_mape = float(np.mean(np.abs(relative)))
        count_mpe = float(np.mean(relative))
    else:
        count_mape = count_mpe = math.nan

    det_precision, det_recall, det_f1 = _ratios(
        totals["det_tp"], totals["det_fp"], totals["det_fn"]
    )
    seg_precision, seg_recall, seg_f1 = _ratios(
        totals["seg_tp"], totals["seg_fp"], totals["seg_fn"]
    )
    return {
        "n_images": len(rows),
        "n_images_no_cells": int(np.count_nonzero(~has_cells)),
        **totals,
        "det_precision": det_precision,
        "det_recall": det_recall,
        "det_f1": det_f1,
        "seg_precision": seg_precision,
        "seg_recall": seg_recall,
        "seg_f1": seg_f1,
        "count_mae": float(np.mean(np.abs(errors))),
        "count_median_ae": float(np.median(np.abs(errors))),
        "count_mape": count_mape,
        "count_mpe": count_mpe,
        "false_count_no_cells": int(pred_counts[~has_cells].sum()),
    }


def per_image_table(
    names: Sequence[str], rows: Sequence[dict[str, int | float]]
) -> pd.DataFrame:
    """Build a table with one row per image from names and :func:`image_metrics` results.

    Parameters
    ----------
    names : sequence of str
        Image names, in the order of ``rows``.
    rows : sequence of dict
        Outputs of :func:`image_metrics`.

    Returns
    -------
    pandas.DataFrame
        Column ``name``, then the keys of the rows in the order of the first row, then
        ``count_error`` (``pred_count - true_count``). One row per image, default index.

    Raises
    ------
    ValueError
        If ``names`` and ``rows`` differ in length.
    """
    if len(names) != len(rows):
        raise ValueError(
            f"names and rows must have the same length, got {len(names)} names and "
            f"{len(rows)} rows; pass one name per image_metrics() result"
        )
    table = pd.DataFrame(list(rows))
    table.insert(0, "name", list(names))
    if "true_count" in table and "pred_count" in table:
        table["count_error"] = table["pred_count"] - table["true_count"]
    return table
