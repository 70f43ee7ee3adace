"""Turn a probability map into a label image of cells and measure each cell.

The steps are, in order: threshold, hole filling, small-object removal, splitting of
touching cells with a distance-transform watershed, and consecutive relabelling. Every
step has one parameter in :class:`PostprocessConfig`. Label images are int32 with
0 = background and 1..N = cells. Cells are 8-connected components.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage
from skimage.feature import peak_local_max
from skimage.segmentation import relabel_sequential, watershed

logger = logging.getLogger(__name__)

# Structuring elements for scipy.ndimage.label: cells are 8-connected, so the holes inside
# them are the 4-connected components of the background.
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
FOUR_CONNECTED = ndimage.generate_binary_structure(2, 1)

MEASURE_COLUMNS = (
    "cell_id",
    "centroid_x",
    "centroid_y",
    "area_px",
    "equivalent_diameter_px",
    "mean_probability",
)


@dataclass(frozen=True)
class PostprocessConfig:
    """Parameters of :func:`label_cells`. Sizes are in pixels of the original image.

    Attributes
    ----------
    threshold : float
        A pixel is foreground when its probability is strictly greater than this value.
        Must lie in the open interval (0, 1).
    hole_size_px : int
        Background regions enclosed by a cell with an area below this many pixels are
        filled. 0 disables hole filling.
    min_size_px : int
        Connected components with an area below this many pixels are removed before the
        watershed. 0 disables the removal.
    watershed : bool
        Split touching cells with a distance-transform watershed. When False, each
        8-connected component is one cell.
    footprint_px : int
        Side of the square window used to find watershed seeds. A pixel seeds a cell when
        its distance to the background is the maximum within the window centred on it. A
        touching cell whose centre lies within about ``footprint_px / 2`` of the centre
        of a wider cell gets no seed and merges into it, so set this near the smallest
        cell diameter.
    """

    threshold: float = 0.5
    hole_size_px: int = 50
    min_size_px: int = 200
    watershed: bool = True
    footprint_px: int = 40

    def __post_init__(self) -> None:
        _check_threshold(self.threshold)
        _check_size("hole_size_px", self.hole_size_px, minimum=0)
        _check_size("min_size_px", self.min_size_px, minimum=0)
        _check_size("footprint_px", self.footprint_px, minimum=1)
        if not isinstance(self.watershed, (bool, np.bool_)):
            raise TypeError(
                f"watershed must be True or False, got {self.watershed!r} "
                f"of type {type(self.watershed).__name__}"
            )

    def to_dict(self) -> dict[str, Any]:
        """Return the parameters as a dict of plain Python values, for JSON or MLflow."""
        # NumPy scalars such as np.float32 are not JSON serialisable, so unwrap them.
        return {
            field.name: _to_python(getattr(self, field.name)) for field in fields(self)
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> PostprocessConfig:
        """Build a config from a dict such as the output of :meth:`to_dict`.

        Missing keys take their default value.

        Raises
        ------
        ValueError
            If ``values`` contains a key that is not a field of this class.
        """
        known = {field.name for field in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(
                f"unknown PostprocessConfig keys {unknown}; the valid keys are {sorted(known)}"
            )
        return cls(**values)


def _to_python(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _check_threshold(threshold: float) -> None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)):
        raise TypeError(f"threshold must be a number in (0, 1), got {threshold!r}")
    if not 0.0 < float(threshold) < 1.0:
        raise ValueError(
            f"threshold must lie strictly between 0 and 1, got {threshold!r}; "
            "pass a probability such as 0.5"
        )


def _check_size(name: str, value: int, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an integer number of pixels, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum} pixels, got {value}")


def _check_mask(mask: np.ndarray, name: str = "mask") -> None:
    if not isinstance(mask, np.ndarray) or mask.dtype != bool or mask.ndim != 2:
        shape = getattr(mask, "shape", None)
        dtype = getattr(mask, "dtype", type(mask).__name__)
        raise TypeError(
            f"{name} must be a 2-D bool array (H, W), got dtype {dtype} and shape {shape}; "
            "convert with `array > 0` or take a single channel first"
        )


def _check_probability(probability: np.ndarray, name: str = "probability") -> None:
    if not isinstance(probability, np.ndarray) or probability.ndim != 2:
        raise TypeError(
            f"{name} must be a 2-D float array (H, W), "
            f"got shape {getattr(probability, 'shape', None)}"
        )
    if not np.issubdtype(probability.dtype, np.floating):
        raise TypeError(
            f"{name} must be a float array of probabilities in [0, 1], got dtype "
            f"{probability.dtype}; apply a sigmoid to logits or divide raw values by their maximum"
        )
    if probability.size == 0:
        return
    low = float(np.min(probability))
    high = float(np.max(probability))
    if math.isnan(low) or math.isnan(high):
        raise ValueError(f"{name} contains NaN values; check the model output")
    if low < 0.0 or high > 1.0:
        raise ValueError(
            f"{name} values must lie in [0, 1], got the range [{low}, {high}]; "
            "pass sigmoid(logits), or np.clip the map if interpolation overshot the range"
        )


def validate_labels(labels: np.ndarray, name: str = "labels") -> None:
    """Raise TypeError or ValueError unless ``labels`` is a 2-D non-negative integer label image."""
    if not isinstance(labels, np.ndarray) or labels.ndim != 2:
        raise TypeError(
            f"{name} must be a 2-D integer label image (H, W), "
            f"got shape {getattr(labels, 'shape', None)}"
        )
    if labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(
            f"{name} must have an integer dtype with 0 = background, got {labels.dtype}; "
            "label a bool mask with ccflow.metrics.label_mask first"
        )
    if labels.size and labels.min() < 0:
        raise ValueError(f"{name} must not contain negative labels, got minimum {labels.min()}")


def fill_small_holes(mask: np.ndarray, hole_size_px: int) -> np.ndarray:
    """Fill the holes of a mask whose area is below ``hole_size_px`` pixels.

    A hole is a 4-connected background region that does not touch the image border, which
    is the background connectivity that matches 8-connected cells.

    Parameters
    ----------
    mask : numpy.ndarray
        bool (H, W), True = cell.
    hole_size_px : int
        Holes with fewer pixels than this are filled. 0 returns a copy of the mask.

    Returns
    -------
    numpy.ndarray
        bool (H, W), a new array.
    """
    _check_mask(mask)
    _check_size("hole_size_px", hole_size_px, minimum=0)
    filled = mask.copy()
    if hole_size_px == 0 or mask.size == 0:
        return filled

    background, _ = ndimage.label(~mask, structure=FOUR_CONNECTED)
    sizes = np.bincount(background.ravel())
    touches_border = np.zeros(sizes.shape, dtype=bool)
    for edge in (background[0, :], background[-1, :], background[:, 0], background[:, -1]):
        touches_border[edge] = True

    is_small_hole = (sizes < hole_size_px) & ~touches_border
    is_small_hole[0] = False  # label 0 is the foreground itself
    filled[is_small_hole[background]] = True
    return filled


def remove_small_objects(mask: np.ndarray, min_size_px: int) -> np.ndarray:
    """Remove the 8-connected components of a mask whose area is below ``min_size_px``.

    Parameters
    ----------
    mask : numpy.ndarray
        bool (H, W), True = cell.
    min_size_px : int
        Components with fewer pixels than this are removed. 0 returns a copy of the mask.

    Returns
    -------
    numpy.ndarray
        bool (H, W), a new array.
    """
    _check_mask(mask)
    _check_size("min_size_px", min_size_px, minimum=0)
    if min_size_px == 0 or mask.size == 0:
        return mask.copy()

    components, _ = ndimage.label(mask, structure=EIGHT_CONNECTED)
    sizes = np.bincount(components.ravel())
    keep = sizes >= min_size_px
    keep[0] = False
    return keep[components]


def split_touching_cells(mask: np.ndarray, footprint_px: int) -> np.ndarray:
    """Label a mask, splitting touching cells with a distance-transform watershed.

    The Euclidean distance to the background is computed for every foreground pixel. Its
    local maxima within a ``footprint_px`` square window seed the cells, where each
    connected plateau of maxima is one seed. The watershed of the negated distance then
    grows the seeds inside the mask. A component that receives no seed keeps one label.

    Parameters
    ----------
    mask : numpy.ndarray
        bool (H, W), True = cell.
    footprint_px : int
        Side in pixels of the window used to find the distance maxima.

    Returns
    -------
    numpy.ndarray
        int32 (H, W) labels, 0 = background. The labels are not necessarily consecutive.
    """
    _check_mask(mask)
    _check_size("footprint_px", footprint_px, minimum=1)
    components, n_components = ndimage.label(mask, structure=EIGHT_CONNECTED)
    if n_components == 0:
        return components.astype(np.int32)

    distance = ndimage.distance_transform_edt(mask)
    peak_coords = peak_local_max(
        distance,
        footprint=np.ones((footprint_px, footprint_px), dtype=bool),
        labels=components,
        exclude_border=False,
    )
    peaks = np.zeros(mask.shape, dtype=bool)
    peaks[tuple(peak_coords.T)] = True
    markers, n_markers = ndimage.label(peaks, structure=EIGHT_CONNECTED)

    # Seed every component that has no peak with the whole component, so no cell is lost.
    seeded = np.zeros(n_components + 1, dtype=bool)
    seeded[np.unique(components[peaks])] = True
    unseeded = ~seeded[components] & mask
    if unseeded.any():
        extra, _ = ndimage.label(unseeded, structure=EIGHT_CONNECTED)
        markers[unseeded] = extra[unseeded] + n_markers

    labels = watershed(-distance, markers, mask=mask, connectivity=2)
    return labels.astype(np.int32)


def relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    """Renumber the labels to 1..N in order of their old values, keeping 0 as background.

    Returns
    -------
    numpy.ndarray
        int32 (H, W) labels.
    """
    validate_labels(labels)
    relabelled, _, _ = relabel_sequential(labels)
    return relabelled.astype(np.int32)


def label_foreground(
    mask: np.ndarray,
    *,
    hole_size_px: int,
    min_size_px: int,
    watershed: bool,
    footprint_px: int,
) -> np.ndarray:
    """Fill holes, remove small objects, split touching cells and relabel a foreground mask.

    These are the steps of :func:`label_cells` after the threshold. The parameters have
    the meaning given in :class:`PostprocessConfig`.

    Parameters
    ----------
    mask : numpy.ndarray
        bool (H, W), True = foreground.

    Returns
    -------
    numpy.ndarray
        int32 (H, W) labels, 0 = background, cells numbered 1..N.
    """
    _check_mask(mask)
    cleaned = fill_small_holes(mask, hole_size_px)
    cleaned = remove_small_objects(cleaned, min_size_px)
    if watershed:
        labels = split_touching_cells(cleaned, footprint_px)
    else:
        labels, _ = ndimage.label(cleaned, structure=EIGHT_CONNECTED)
    return relabel_consecutive(labels)


def label_cells(probability: np.ndarray, config: PostprocessConfig) -> np.ndarray:
    """Segment a probability map into a label image of cells.

    A pixel is foreground when its probability is strictly greater than
    ``config.threshold``. Then holes smaller than ``config.hole_size_px`` are filled,
    components smaller than ``config.min_size_px`` are removed, touching cells are split
    by a distance-transform watershed when ``config.watershed`` is set, and the cells are
    numbered 1..N.

    Parameters
    ----------
    probability : numpy.ndarray
        float (H, W) with values in [0, 1], the per-pixel cell probability.
    config : PostprocessConfig
        Parameters of each step.

    Returns
    -------
    numpy.ndarray
        int32 (H, W) labels, 0 = background, cells numbered 1..N.

    Raises
    ------
    TypeError
        If ``probability`` is not a 2-D float array or ``config`` is not a
        PostprocessConfig.
    ValueError
        If ``probability`` contains NaN or values outside [0, 1].
    """
    if not isinstance(config, PostprocessConfig):
        raise TypeError(
            f"config must be a PostprocessConfig, got {type(config).__name__}; "
            "build one with PostprocessConfig(...) or PostprocessConfig.from_dict(...)"
        )
    _check_probability(probability)
    labels = label_foreground(
        probability > config.threshold,
        hole_size_px=config.hole_size_px,
        min_size_px=config.min_size_px,
        watershed=config.watershed,
        footprint_px=config.footprint_px,
    )
    logger.debug("label_cells found %d cells with %s", count_cells(labels), config)
    return labels


def measure_cells(labels: np.ndarray, probability: np.ndarray) -> pd.DataFrame:
    """Measure position, size and mean probability of every cell in a label image.

    Pixel (row, col) has its centre at x = col, y = row, so centroids are in pixels from
    the centre of the top-left pixel.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer (H, W) labels, 0 = background. The labels need not be consecutive.
    probability : numpy.ndarray
        float (H, W) with values in [0, 1], the same shape as ``labels``.

    Returns
    -------
    pandas.DataFrame
        One row per label in increasing label order, with columns ``cell_id`` (int, the
        label), ``centroid_x`` and ``centroid_y`` (float, px), ``area_px`` (int, pixel
        count), ``equivalent_diameter_px`` (float, diameter of the disc of the same area,
        ``sqrt(4 * area / pi)``) and ``mean_probability`` (float). Zero rows when there
        are no cells.

    Raises
    ------
    ValueError
        If the two arrays differ in shape or ``probability`` is outside [0, 1].
    """
    validate_labels(labels)
    _check_probability(probability)
    if labels.shape != probability.shape:
        raise ValueError(
            f"labels and probability must have the same shape, got {labels.shape} and "
            f"{probability.shape}; compute the labels from this probability map"
        )

    cell_ids, index = np.unique(labels, return_inverse=True)
    index = index.reshape(labels.shape)
    has_background = cell_ids.size > 0 and cell_ids[0] == 0
    rows, cols = np.indices(labels.shape)
    n_bins = cell_ids.size

    area = np.bincount(index.ravel(), minlength=n_bins)
    sum_y = np.bincount(index.ravel(), weights=rows.ravel(), minlength=n_bins)
    sum_x = np.bincount(index.ravel(), weights=cols.ravel(), minlength=n_bins)
    sum_p = np.bincount(
        index.ravel(), weights=probability.ravel().astype(np.float64), minlength=n_bins
    )

    first = 1 if has_background else 0
    cell_ids, area = cell_ids[first:], area[first:]
    sum_x, sum_y, sum_p = sum_x[first:], sum_y[first:], sum_p[first:]
    return pd.DataFrame(
        {
            "cell_id": cell_ids.astype(np.int64),
            "centroid_x": sum_x / area,
            "centroid_y": sum_y / area,
            "area_px": area.astype(np.int64),
            "equivalent_diameter_px": np.sqrt(4.0 * area / np.pi),
            "mean_probability": sum_p / area,
        },
        columns=list(MEASURE_COLUMNS),
    )


def count_cells(labels: np.ndarray) -> int:
    """Count the distinct non-zero labels of a label image.

    Parameters
    ----------
    labels : numpy.ndarray
        Integer (H, W) labels, 0 = background. The labels need not be consecutive.

    Returns
    -------
    int
        Number of cells.
    """
    validate_labels(labels)
    ids = np.unique(labels)
    return int(np.count_nonzero(ids))
