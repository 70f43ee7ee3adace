"""Tiled prediction of a cell-probability map for an image of any size.

A large image is split into overlapping tiles that the network processes in batches.
Each output pixel comes from the tile whose centre is nearest, so every kept pixel has
at least ``overlap // 2`` pixels of context on each side and the stitched map has no
seams.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch
from torch import nn

from ccflow.data import resample_image, resize_image
from ccflow.model import input_multiple

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Tile:
    """A tile of the padded network image and the part of it that goes to the output.

    All coordinates are network pixels in the padded image. The tile covers rows
    ``y0:y0 + height`` and columns ``x0:x0 + width``. Its prediction is kept for rows
    ``keep_y0:keep_y1`` and columns ``keep_x0:keep_x1``.
    """

    y0: int
    x0: int
    height: int
    width: int
    keep_y0: int
    keep_y1: int
    keep_x0: int
    keep_x1: int


def validate_float_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Check that ``image`` is a float RGB image in [0, 1] and return it as float32.

    Parameters
    ----------
    image : numpy.ndarray
        Floating-point array of shape (H, W, 3) with values in [0, 1].
    name : str
        Parameter name used in error messages.

    Returns
    -------
    numpy.ndarray
        float32 (H, W, 3), the input itself when it is already float32.

    Raises
    ------
    ValueError
        If the type, shape or value range is wrong.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{name} must be a numpy array of shape (H, W, 3), got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3 or image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"{name} must have shape (H, W, 3) with H, W >= 1, got shape {image.shape}")
    if not np.issubdtype(image.dtype, np.floating):
        raise ValueError(
            f"{name} must be a float image in [0, 1], got dtype {image.dtype}. "
            "Convert raw images with ccflow.data.to_float."
        )
    low = float(image.min())
    high = float(image.max())
    if not (0.0 <= low and high <= 1.0):
        raise ValueError(
            f"{name} values must be finite and in [0, 1], got range [{low}, {high}]. "
            "Convert raw images with ccflow.data.to_float."
        )
    return image.astype(np.float32, copy=False)


def pad_to_multiple(image: np.ndarray, multiple: int) -> np.ndarray:
    """Pad an image at the bottom and right by reflection to a multiple of ``multiple``.

    Parameters
    ----------
    image : numpy.ndarray
        Array of shape (H, W) or (H, W, C), any dtype.
    multiple : int
        Required divisor of the output height and width, at least 1.

    Returns
    -------
    numpy.ndarray
        Shape (ceil(H / multiple) * multiple, ceil(W / multiple) * multiple[, C]). The
        top-left (H, W) block equals the input. The input itself is returned when no
        padding is needed.
    """
    height, width = image.shape[:2]
    pad_bottom = -height % multiple
    pad_right = -width % multiple
    if pad_bottom == 0 and pad_right == 0:
        return image
    padding = [(0, pad_bottom), (0, pad_right)] + [(0, 0)] * (image.ndim - 2)
    return np.pad(image, padding, mode="reflect")


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Return tile start offsets that cover ``length`` with the last tile ending at the end."""
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, stride))
    starts.append(length - tile)
    return starts


def _keep_bounds(starts: list[int], tile: int, length: int) -> list[tuple[int, int]]:
    """Return, per tile, the range of pixels nearer to its centre than to any other tile's."""
    boundaries = [0]
    for previous, current in zip(starts, starts[1:]):
        # Midpoint of the two tile centres, start + tile / 2, rounded down.
        boundaries.append((previous + current + tile) // 2)
    boundaries.append(length)
    return list(zip(boundaries[:-1], boundaries[1:]))


def _plan_tiles(height: int, width: int, tile: int, stride: int) -> list[_Tile]:
    """Split a (height, width) padded image into tiles of side at most ``tile``."""
    tile_height = min(tile, height)
    tile_width = min(tile, width)
    row_starts = _tile_starts(height, tile_height, stride)
    column_starts = _tile_starts(width, tile_width, stride)
    row_keeps = _keep_bounds(row_starts, tile_height, height)
    column_keeps = _keep_bounds(column_starts, tile_width, width)

    tiles = []
    for y0, (keep_y0, keep_y1) in zip(row_starts, row_keeps):
        for x0, (keep_x0, keep_x1) in zip(column_starts, column_keeps):
            tiles.append(_Tile(y0, x0, tile_height, tile_width, keep_y0, keep_y1, keep_x0, keep_x1))
    return tiles


def _tile_geometry(tile_size: int, overlap: int, multiple: int) -> tuple[int, int]:
    """Return tile side and stride, both multiples of ``multiple``, with overlap >= ``overlap``.

    Aligning tile starts to the model's input multiple keeps each tile on the same
    pooling grid as the whole image, so a tile computes the same features as an untiled
    pass wherever its receptive field fits inside the tile.
    """
    tile = tile_size // multiple * multiple
    stride = (tile - overlap) // multiple * multiple
    if tile < multiple or stride < multiple:
        raise ValueError(
            f"tile_size={tile_size} with overlap={overlap} is too small for this model, which "
            f"needs tile sides that are multiples of {multiple} and a stride of at least "
            f"{multiple}. Use tile_size >= overlap + {2 * multiple}."
        )
    return tile, stride


def _model_device(model: nn.Module) -> torch.device | None:
    """Return the device of the model's first parameter, or None for a module without any."""
    parameter = next(model.parameters(), None)
    return None if parameter is None else parameter.device


def predict_network_logits(
    model: nn.Module,
    network_image: np.ndarray,
    *,
    tile_size: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Predict logits for an image that is already at network resolution.

    The caller puts the model in eval mode and on ``device``, as
    :func:`predict_probability` does.

    Parameters
    ----------
    model : torch.nn.Module
        Takes float32 (N, 3, h, w) and returns logits (N, 1, h, w).
    network_image : numpy.ndarray
        float32 (h, w, 3) in [0, 1], in network pixels.
    tile_size, overlap, batch_size, device
        As in :func:`predict_probability`.

    Returns
    -------
    numpy.ndarray
        float32 logits (h, w).
    """
    height, width = network_image.shape[:2]
    multiple = input_multiple(model)
    padded = pad_to_multiple(network_image, multiple)
    padded_height, padded_width = padded.shape[:2]

    if height <= tile_size and width <= tile_size:
        tiles = [_Tile(0, 0, padded_height, padded_width, 0, padded_height, 0, padded_width)]
    else:
        tile, stride = _tile_geometry(tile_size, overlap, multiple)
        tiles = _plan_tiles(padded_height, padded_width, tile, stride)
    logger.debug(
        "Predicting %dx%d network image in %d tile(s) of %dx%d",
        height, width, len(tiles), tiles[0].height, tiles[0].width,
    )

    # Channels-first copy so that each tile slice is ready for torch.
    channels_first = np.ascontiguousarray(padded.transpose(2, 0, 1))
    logits = np.empty((padded_height, padded_width), dtype=np.float32)
    with torch.inference_mode():
        for batch_start in range(0, len(tiles), batch_size):
            batch_tiles = tiles[batch_start : batch_start + batch_size]
            batch = np.stack(
                [channels_first[:, t.y0 : t.y0 + t.height, t.x0 : t.x0 + t.width] for t in batch_tiles]
            )
            output = model(torch.from_numpy(batch).to(device))
            expected_shape = (len(batch_tiles), 1, batch.shape[2], batch.shape[3])
            if tuple(output.shape) != expected_shape:
                raise ValueError(
                    f"model returned shape {tuple(output.shape)} for input {tuple(batch.shape)}, "
                    f"expected {expected_shape}: the model must return one logit per pixel"
                )
            output = output[:, 0].float().cpu().numpy()
            for t, tile_logits in zip(batch_tiles, output):
                logits[t.keep_y0 : t.keep_y1, t.keep_x0 : t.keep_x1] = tile_logits[
                    t.keep_y0 - t.y0 : t.keep_y1 - t.y0, t.keep_x0 - t.x0 : t.keep_x1 - t.x0
                ]
    return logits[:height, :width]


def predict_probability(
    model: nn.Module,
    image: np.ndarray,
    *,
    scale: float = 1.0,
    tile_size: int = 512,
    overlap: int = 64,
    batch_size: int = 4,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Predict the per-pixel cell probability of an image of any size.

    The image is resampled by ``scale`` with :func:`ccflow.data.resample_image`, the
    function that training uses, and padded by reflection at the bottom and right to a
    multiple of :func:`ccflow.model.input_multiple`. An image whose sides are both at
    most ``tile_size`` network pixels runs in one pass. A larger one is cut into tiles
    of side ``tile_size`` (rounded down to the input multiple) that share at least
    ``overlap`` pixels with each neighbour. Tile starts are multiples of the input
    multiple. Each pixel takes the logit of the tile whose centre is nearest. The
    sigmoid of the stitched logits is resized back to the original size.

    Parameters
    ----------
    model : torch.nn.Module
        Takes float32 (N, 3, h, w) and returns logits (N, 1, h, w). It runs in eval mode
        on ``device``. Its training mode and device are restored afterwards.
    image : numpy.ndarray
        float (H, W, 3) in [0, 1], channels last.
    scale : float
        Network pixels per original pixel, for example 0.5 to halve each side.
    tile_size : int
        Maximum tile side in network pixels.
    overlap : int
        Minimum number of network pixels shared by neighbouring tiles. Tiling is exact
        for a model whose receptive field reaches at most ``overlap // 2`` pixels from
        the output pixel.
    batch_size : int
        Number of tiles per forward pass.
    device : str or torch.device
        Device to run the model on, for example ``"cpu"`` or ``"cuda"``.

    Returns
    -------
    numpy.ndarray
        float32 (H, W) probabilities in [0, 1] at the original size.

    Raises
    ------
    ValueError
        If the image is not a float (H, W, 3) image in [0, 1], a parameter is out of
        range, or the model returns a shape other than (N, 1, h, w).
    """
    image = validate_float_image(image)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number above 0, got {scale}")
    if tile_size < 1:
        raise ValueError(f"tile_size must be at least 1 network pixel, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size={tile_size}), got {overlap}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")

    height, width = image.shape[:2]
    network_image = image if scale == 1.0 else resample_image(image, scale)
    network_image = network_image.astype(np.float32, copy=False)

    was_training = model.training
    original_device = _model_device(model)
    model.eval()
    if original_device is not None:
        model.to(device)
    try:
        logits = predict_network_logits(
            model,
            network_image,
            tile_size=tile_size,
            overlap=overlap,
            batch_size=batch_size,
            device=device,
        )
    finally:
        model.train(was_training)
        if original_device is not None:
            model.to(original_device)

    probability = torch.sigmoid(torch.from_numpy(logits)).numpy()
    probability = resize_image(probability, (height, width))
    return np.clip(probability, 0.0, 1.0, out=probability)

