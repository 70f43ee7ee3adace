"""Log ccflow models to MLflow as pyfunc models, register them and load them back.

A logged model contains the network weights as an artifact and, as its model config, the
architecture, the resampling scale, the tile size and the post-processing parameters
(the threshold included), so that every consumer counts the same way.
"""

from __future__ import annotations

import base64
import json
import logging
from pathlib import Path

import cv2
import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

from ccflow.counter import CellCounter
from ccflow.data import decode_image
from ccflow.errors import ImageReadError
from ccflow.postprocess import PostprocessConfig
from ccflow.serving import IMAGE_COLUMN, RequestError, RequestLimits, check_frame, image_bytes

logger = logging.getLogger(__name__)

WEIGHTS_ARTIFACT = "weights"

# The model needs the same libraries as ccflow itself. ccflow is not listed because it is
# installed from its own repository, not from a package index.
PIP_REQUIREMENTS = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "segmentation-models-pytorch==0.6.0",
    "albumentations==2.0.8",
    "grad-cam==1.5.7",
    "scikit-image==0.26.0",
    "tifffile==2026.3.3",
    "pandas==3.1.1",
    "mlflow==3.17.2",
]

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", IMAGE_COLUMN)]),
    outputs=Schema(
        [
            ColSpec("long", "count"),
            ColSpec("double", "mean_probability"),
            ColSpec("string", "cells"),
            ColSpec("string", "overlay", required=False),
        ]
    ),
    params=ParamSchema([ParamSpec("overlay", "boolean", False)]),
)


class CellCounterModel(mlflow.pyfunc.PythonModel):
    """MLflow pyfunc wrapper around :class:`ccflow.counter.CellCounter`.

    Input: a DataFrame with a column ``image`` of encoded PNG or TIFF bytes (base64 in
    JSON requests to a served model). Output: one row per image with ``count``,
    ``mean_probability``, ``cells`` (JSON list of per-cell rows) and, when the parameter
    ``overlay`` is true, ``overlay`` (base64 PNG with outlines and the Grad-CAM heatmap).

    A request without images, with a wrong column, over the limits of
    :class:`ccflow.serving.RequestLimits` or with an image that does not decode raises
    ``MlflowException`` with ``INVALID_PARAMETER_VALUE``, which the scoring server returns
    as HTTP 400 with the message. All images are checked and decoded before the first one
    is counted.
    """

    def load_context(self, context) -> None:
        self.counter = CellCounter.from_files(
            Path(context.artifacts[WEIGHTS_ARTIFACT]), context.model_config
        )
        self.limits = RequestLimits.from_environment()

    def predict(self, context, model_input, params=None):
        explain = bool((params or {}).get("overlay", False))
        # Models pickled before the limits existed have no `limits` attribute.
        limits = getattr(self, "limits", None) or RequestLimits.from_environment()
        try:
            column = check_frame(model_input, limits)
            images = [
                decode_image(image_bytes(value, position, limits), f"row {position}")
                for position, value in enumerate(column)
            ]
        except (RequestError, ImageReadError) as error:
            raise MlflowException(str(error), error_code=INVALID_PARAMETER_VALUE) from error

        rows = []
        for image in images:
            result = self.counter.count(image, explain=explain)
            row = {
                "count": result.count,
                "mean_probability": result.mean_probability,
                "cells": result.cells.to_json(orient="records"),
            }
            if explain:
                row["overlay"] = base64.b64encode(encode_png(result.overlay)).decode("ascii")
            rows.append(row)
        return pd.DataFrame(rows)


def log_counter_model(
    *,
    weights: Path,
    arch: str,
    base_width: int,
    scale: float,
    tile_size: int,
    postprocess: PostprocessConfig,
    registered_model_name: str | None,
    version_tags: dict[str, str] | None = None,
    description: str | None = None,
):
    """Log a trained network as a pyfunc model in the active run and register it.

    Parameters
    ----------
    weights : Path
        File written by ``torch.save(model.state_dict(), ...)``.
    arch, base_width : str, int
        Arguments of :func:`ccflow.model.build_model` that rebuild the network.
    scale : float
        Resampling factor the network was trained at.
    tile_size : int
        Tile side in network pixels for large images.
    postprocess : PostprocessConfig
        Post-processing to store as model config.
    registered_model_name : str or None
        Register a new version of this model; None only logs the model.
    version_tags : dict, optional
        Tags set on the new model version (metrics, data fingerprint).
    description : str, optional
        Description of the new model version, shown in the MLflow UI.

    Returns
    -------
    mlflow.models.model.ModelInfo
    """
    config = {
        "arch": arch,
        "base_width": base_width,
        "scale": scale,
        "tile_size": tile_size,
        "postprocess": postprocess.to_dict(),
    }
    example = pd.DataFrame({IMAGE_COLUMN: [encode_png(np.zeros((64, 64, 3), np.uint8))]})
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=CellCounterModel(),
        artifacts={WEIGHTS_ARTIFACT: str(weights)},
        model_config=config,
        signature=SIGNATURE,
        input_example=example,
        pip_requirements=PIP_REQUIREMENTS,
        registered_model_name=registered_model_name,
    )
    if registered_model_name and info.registered_model_version is not None:
        client = mlflow.MlflowClient()
        version = str(info.registered_model_version)
        for key, value in (version_tags or {}).items():
            client.set_model_version_tag(registered_model_name, version, key, value)
        client.update_model_version(
            registered_model_name,
            version,
            description=description or _describe(config, version_tags or {}),
        )
        logger.info("Registered %s version %s", registered_model_name, version)
    return info


def load_counter(model_uri: str) -> CellCounter:
    """Load a logged or registered model as a :class:`CellCounter`.

    Parameters
    ----------
    model_uri : str
        Any MLflow model URI, for example ``models:/ccflow-cell-counter/3``,
        ``models:/ccflow-cell-counter@champion`` or ``runs:/<run id>/model``.
    """
    try:
        pyfunc_model = mlflow.pyfunc.load_model(model_uri)
    except MlflowException as error:
        raise MlflowException(
            f"Cannot load model {model_uri!r}: {error.message} Check the name and version "
            "in the MLflow UI, and that MLFLOW_TRACKING_URI points at the right server.",
            error_code=error.error_code,
        ) from error
    python_model = pyfunc_model.unwrap_python_model()
    if not isinstance(python_model, CellCounterModel):
        raise TypeError(
            f"Model {model_uri!r} is a {type(python_model).__name__}, not a ccflow cell counter."
        )
    return python_model.counter


def encode_png(image: np.ndarray) -> bytes:
    """Encode an image as PNG bytes.

    Parameters
    ----------
    image : ndarray, uint8 or uint16, shape (H, W) or (H, W, 3) in RGB order
        The image to encode.

    Raises
    ------
    ValueError
        The image has another dtype or shape, or OpenCV cannot encode it.
    """
    image = np.asarray(image)
    if image.dtype not in (np.uint8, np.uint16) or not (
        image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)
    ):
        raise ValueError(
            f"Cannot encode an image of dtype {image.dtype} and shape {image.shape} as PNG: "
            "expected uint8 or uint16, shape (H, W) or (H, W, 3)."
        )
    # OpenCV writes colour images in BGR order.
    bgr = image[:, :, ::-1] if image.ndim == 3 else image
    ok, buffer = cv2.imencode(".png", np.ascontiguousarray(bgr))
    if not ok:
        raise ValueError(f"OpenCV failed to encode an image of shape {image.shape} as PNG.")
    return buffer.tobytes()


def _describe(config: dict, tags: dict[str, str]) -> str:
    scores = ", ".join(
        f"{k} {tags[k]}" for k in ("eval_det_f1", "eval_seg_f1", "eval_count_mape") if k in tags
    )
    return (
        f"ccflow cell counter: {config['arch']} (base width {config['base_width']}), "
        f"scale {config['scale']}, post-processing {json.dumps(config['postprocess'])}. "
        f"Validation: {scores or 'not evaluated'}."
    )
