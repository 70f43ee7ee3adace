"""Turn one image into a cell count, per-cell measurements and an explained overlay.

:class:`CellCounter` is the single code path behind ``ccflow count``, the MLflow pyfunc
model and ``mlflow models serve``, so all three give the same count for the same image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from ccflow.data import to_float
from ccflow.explain import gradcam_heatmap, render_overlay
from ccflow.inference import predict_probability
from ccflow.model import build_model
from ccflow.postprocess import PostprocessConfig, label_cells, measure_cells

logger = logging.getLogger(__name__)


@dataclass
class CountResult:
    """Cells found in one image.

    Attributes
    ----------
    count : int
        Number of labelled cells.
    labels : ndarray, int32, shape (H, W)
        Label image at the original size; 0 is background, 1..count are cells.
    probability : ndarray, float32, shape (H, W)
        Foreground probability in [0, 1].
    cells : pandas.DataFrame
        One row per cell, columns of :func:`ccflow.postprocess.measure_cells`; centroids,
        areas and diameters are in original pixels.
    overlay : ndarray, uint8, shape (H, W, 3), or None
        The image with cell outlines and the Grad-CAM heatmap, when requested.
    """

    count: int
    labels: np.ndarray
    probability: np.ndarray
    cells: pd.DataFrame
    overlay: np.ndarray | None = None

    @property
    def mean_probability(self) -> float:
        """Mean foreground probability over the pixels of detected cells (NaN if none)."""
        inside = self.labels > 0
        return float(self.probability[inside].mean()) if inside.any() else float("nan")


class CellCounter:
    """A trained network with the post-processing that turns its output into counts.

    Parameters
    ----------
    model : torch.nn.Module
        Network mapping float32 (N, 3, H, W) images to logits (N, 1, H, W).
    postprocess : PostprocessConfig
        Threshold and clean-up steps, in original pixels.
    scale : float
        Resampling factor applied before the network and undone after it.
    tile_size : int
        Side of the square tiles, in network pixels, that large images are split into.
    device : str
        Torch device to run on.
    """

    def __init__(
        self,
        model: nn.Module,
        postprocess: PostprocessConfig,
        *,
        scale: float = 1.0,
        tile_size: int = 512,
        device: str = "cpu",
    ) -> None:
        self.model = model.to(device).eval()
        self.postprocess = postprocess
        self.scale = scale
        self.tile_size = tile_size
        self.device = device

    @classmethod
    def from_files(cls, weights: Path, config: dict, device: str = "cpu") -> "CellCounter":
        """Build a counter from a state-dict file and the model config stored with it."""
        model = build_model(config["arch"], int(config["base_width"]))
        state = torch.load(weights, map_location=device, weights_only=True)
        model.load_state_dict(state)
        return cls(
            model,
            PostprocessConfig.from_dict(config["postprocess"]),
            scale=float(config["scale"]),
            tile_size=int(config["tile_size"]),
            device=device,
        )

    def count(self, image: np.ndarray, *, explain: bool = False) -> CountResult:
        """Count the cells of one image.

        Parameters
        ----------
        image : ndarray, shape (H, W, 3)
            Raw (uint8 or uint16) or float image in [0, 1].
        explain : bool
            Also compute the Grad-CAM heatmap and render the overlay.

        Returns
        -------
        CountResult
        """
        float_image = to_float(image)
        probability = predict_probability(
            self.model, float_image, scale=self.scale, tile_size=self.tile_size, device=self.device
        )
        labels = label_cells(probability, self.postprocess)
        cells = measure_cells(labels, probability)
        overlay = None
        if explain:
            heatmap = gradcam_heatmap(self.model, float_image, scale=self.scale)
            overlay = render_overlay(float_image, labels, heatmap)
        return CountResult(
            count=int(labels.max(initial=0)),
            labels=labels,
            probability=probability,
            cells=cells,
            overlay=overlay,
        )
