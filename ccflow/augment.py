"""Training augmentation built on albumentations 2.0.8.

albumentations is imported inside :func:`training_transform`, after setting
``NO_ALBUMENTATIONS_UPDATE=1`` unless the caller set it already. Without that variable,
``import albumentations`` sends a version query to pypi.org (albumentations 2.0.8,
``albumentations/__init__.py`` and ``check_version.py``).
"""

from __future__ import annotations

import logging
import os
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

if TYPE_CHECKING:
    import albumentations

logger = logging.getLogger(__name__)

ZOOM_RANGE = (0.8, 1.25)
"""Range of random zoom factors. Values below 1 zoom out."""

ROTATION_LIMIT_DEG = 30.0
"""Maximum rotation in either direction, in degrees."""

BRIGHTNESS_LIMIT = 0.2
"""Maximum brightness shift, as a fraction of the full scale 1.0."""

CONTRAST_LIMIT = 0.2
"""Maximum relative contrast change."""

DISTORTING_TRANSFORM_NAMES = ("Elastic", "Grid", "Piecewise", "OpticalDistortion", "ThinPlateSpline")
"""Parts of the class names of transforms that warp cell shapes. The pipeline uses none of them."""


def import_albumentations() -> Any:
    """Import albumentations with its online version check turned off and return the module."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    import albumentations

    return albumentations


def _clip_to_unit_range(image: np.ndarray, **_params: Any) -> np.ndarray:
    return np.clip(image, 0.0, 1.0, dtype=np.float32)


def training_transform(crop_size: int, seed: int | None = None) -> albumentations.Compose:
    """Build the augmentation pipeline for training crops.

    Parameters
    ----------
    crop_size : int
        Side of the output crop in pixels, above 0.
    seed : int or None
        Seed of the pipeline's random state. :class:`ccflow.data.CropDataset` reseeds it
        for every item with ``set_random_seed``.

    Returns
    -------
    albumentations.Compose
        Call it as ``transform(image=image, mask=mask)``. ``image`` is float32 (H, W, 3) in
        [0, 1] and ``mask`` uint8 (H, W) of 0 and 1 (any H and W). The result has ``image``
        float32 (crop_size, crop_size, 3) clipped to [0, 1] and ``mask`` uint8
        (crop_size, crop_size) with the input's values. In order, the steps are:

        - zoom by 0.8 to 1.25 and rotate by up to 30 degrees in one affine warp, with
          bilinear interpolation for the image, nearest for the mask, and reflected borders,
        - horizontal and vertical flips, each with probability 0.5,
        - brightness and contrast shifts of up to 0.2, with probability 0.8,
        - reflect-padding of an input smaller than the crop, then a random crop of
          ``crop_size``,
        - clipping of the image to [0, 1].

        No elastic or grid distortion is used, because it would warp cell shapes.
    """
    if crop_size <= 0:
        raise ValueError(f"crop_size must be a positive number of pixels, got {crop_size}.")
    A = import_albumentations()

    transforms = [
        A.Affine(
            scale=ZOOM_RANGE,
            rotate=(-ROTATION_LIMIT_DEG, ROTATION_LIMIT_DEG),
            balanced_scale=True,
            keep_ratio=True,
            interpolation=cv2.INTER_LINEAR,
            mask_interpolation=cv2.INTER_NEAREST,
            border_mode=cv2.BORDER_REFLECT_101,
            p=1.0,
        ),
        A.HorizontalFlip(p=0.5),
        A.VerticalFlip(p=0.5),
        A.RandomBrightnessContrast(
            brightness_limit=BRIGHTNESS_LIMIT,
            contrast_limit=CONTRAST_LIMIT,
            brightness_by_max=True,
            p=0.8,
        ),
        A.PadIfNeeded(
            min_height=crop_size,
            min_width=crop_size,
            border_mode=cv2.BORDER_REFLECT_101,
            p=1.0,
        ),
        A.RandomCrop(height=crop_size, width=crop_size, p=1.0),
        A.Lambda(image=_clip_to_unit_range, name="clip_to_unit_range", p=1.0),
    ]
    return A.Compose(transforms, seed=seed)


def list_transform_names(transform: Any) -> list[str]:
    """Return the class names of every transform in a pipeline, nested ones included."""
    names = [type(transform).__name__]
    for child in getattr(transform, "transforms", []):
        names.extend(list_transform_names(child))
    return names
