"""Score a segmentation model on labelled images: probabilities, labels, metrics.

Training uses these functions for its per-epoch validation score and its final
evaluation, and ``ccflow evaluate`` uses them on a labelled folder.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np
import pandas as pd
from torch import nn

from ccflow.inference import predict_probability
from ccflow.metrics import image_metrics, label_mask, per_image_table, pooled_metrics
from ccflow.postprocess import PostprocessConfig, label_cells

logger = logging.getLogger(__name__)

# Candidate thresholds for threshold="auto". Morelli et al. (Scientific Reports, 2021)
# likewise pick the threshold with the best detection F1 on validation images.
THRESHOLD_GRID = tuple(np.round(np.arange(0.30, 0.91, 0.05), 2))


@dataclass
class Evaluation:
    """Metrics of one model on a set of labelled images.

    Attributes
    ----------
    per_image : pandas.DataFrame
        One row per image (column ``file`` plus the keys of
        :func:`ccflow.metrics.image_metrics`).
    pooled : dict of str to float
        Metrics pooled over all images, from :func:`ccflow.metrics.pooled_metrics`.
    postprocess : PostprocessConfig
        The post-processing the labels were made with (its threshold may have been chosen
        on these images).
    """

    per_image: pd.DataFrame
    pooled: dict[str, float]
    postprocess: PostprocessConfig


def predict_probabilities(
    model: nn.Module,
    images: Sequence[np.ndarray],
    *,
    scale: float,
    tile_size: int,
    device: str = "cpu",
) -> list[np.ndarray]:
    """Predict the foreground probability map of each float image, at its original size."""
    return [
        predict_probability(model, image, scale=scale, tile_size=tile_size, device=device)
        for image in images
    ]


def score_probabilities(
    names: Sequence[str],
    probabilities: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    postprocess: PostprocessConfig,
) -> Evaluation:
    """Label each probability map and compare it with the true mask.

    Parameters
    ----------
    names : sequence of str
        Image names, used as the ``file`` column.
    probabilities : sequence of ndarray, float32, shape (H, W)
        Foreground probabilities in [0, 1] at the original image size.
    masks : sequence of ndarray, bool, shape (H, W)
        True cell masks; each 8-connected component is one cell.
    postprocess : PostprocessConfig
        Threshold and clean-up steps applied to each probability map.

    Returns
    -------
    Evaluation
    """
    rows = []
    for probability, mask in zip(probabilities, masks, strict=True):
        predicted = label_cells(probability, postprocess)
        rows.append(image_metrics(label_mask(mask), predicted))
    return Evaluation(
        per_image=per_image_table(list(names), rows),
        pooled=pooled_metrics(rows),
        postprocess=postprocess,
    )


def choose_threshold(
    probabilities: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    postprocess: PostprocessConfig,
    grid: Sequence[float] = THRESHOLD_GRID,
) -> float:
    """Return the threshold of ``grid`` with the highest pooled detection F1.

    Ties go to the threshold closest to 0.5, so that a flat score curve keeps the usual
    default.
    """
    names = [str(i) for i in range(len(probabilities))]
    best_threshold, best_key = 0.5, (-1.0, 0.0)
    for threshold in grid:
        candidate = replace(postprocess, threshold=float(threshold))
        f1 = score_probabilities(names, probabilities, masks, candidate).pooled["det_f1"]
        key = (f1, -abs(threshold - 0.5))
        if key > best_key:
            best_threshold, best_key = float(threshold), key
    logger.info("Chose threshold %.2f (pooled detection F1 %.3f)", best_threshold, best_key[0])
    return best_threshold
