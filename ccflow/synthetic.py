"""Synthetic fluorescence images of stained cells with exact masks.

The images imitate 8-bit RGB widefield pictures of yellow-stained neurons on a dark
background: textured cells of varied size, elongation, orientation, brightness and hue,
some in touching pairs, dim out-of-focus cells, unlabelled debris and fibres, background
autofluorescence, an uneven illumination and shot noise. They serve tests and smoke-test
training runs where real annotated data is absent or too small.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from scipy import ndimage

from ccflow.data import _remove_label_contacts

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
"""Version of the rendering code, stored with written datasets. Bump it when images change."""

MANIFEST_NAME = "synthetic.json"
_FILE_PATTERN = re.compile(r"^synth_\d{3,}\.png$")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_BLUE_TO_RED = (0.03, 0.1)
_BACKGROUND_COLOUR = (1.0, 0.35, 0.02)
_DIRECTIONS = np.linspace(0, 2 * np.pi, 72, endpoint=False)


@dataclass
class SyntheticConfig:
    """Parameters of the synthetic image generator.

    Intensities are fractions of the 8-bit full scale (1.0 = 255) in the red channel, which
    is the brightest channel of yellow and orange stains. Ranges are (low, high) pairs,
    sampled uniformly unless a field documents another distribution, and inclusive for
    counts.

    Attributes
    ----------
    height, width : int
        Image size in pixels.
    cells_per_image : tuple of (int, int)
        Number of in-focus cells before touching partners are added. Cells that do not fit
        without overlapping others after 50 tries are skipped.
    cell_diameter_px : tuple of (float, float)
        Equivalent diameter of a cell (the diameter of a disc of the same area), in pixels.
    max_elongation : float
        Maximum ratio of the long to the short axis of a cell, at least 1. Ratios follow a
        Beta(2, 3) distribution scaled to [1, max_elongation].
    touching_pair_fraction : float
        Probability that an in-focus cell gets a touching partner cell. The two cells touch
        or overlap slightly in the image, but the mask keeps at least one background pixel
        between them so that each stays one 8-connected component.
    cell_brightness : tuple of (float, float)
        Peak intensity of in-focus cells before texture.
    out_of_focus_per_image : tuple of (int, int)
        Number of dim, blurred out-of-focus cells.
    out_of_focus_brightness : tuple of (float, float)
        Peak intensity of out-of-focus cells before blurring.
    out_of_focus_blur_px : tuple of (float, float)
        Gaussian blur sigma of out-of-focus cells, in pixels.
    label_min_brightness : float
        A cell appears in the mask only when its rendered peak intensity (after blur, before
        illumination and noise) is at least this value. With the default ranges, in-focus
        cells pass (their peaks measured 0.26 or more over 474 cells at the lowest default
        brightness), and out-of-focus cells pass or not depending on brightness and blur.
    min_label_area_px : int
        Labelled cells with fewer pixels inside the image, such as slivers at the border,
        are left out of the mask.
    debris_per_image : tuple of (int, int)
        Number of small faint unlabelled dots of 1 to 3 px radius.
    fibres_per_image : tuple of (int, int)
        Number of faint unlabelled fibres, like out-of-focus neurites.
    debris_brightness : tuple of (float, float)
        Intensity of debris dots. Fibres get half of it. Debris and fibres are never
        labelled.
    background_level : tuple of (float, float)
        Mean autofluorescence of the background.
    gradient_strength : float
        Relative amplitude of the smooth illumination gradient and vignetting, in [0, 1).
    green_to_red : tuple of (float, float)
        Green-to-red ratio of the cells' colour: about 0.5 is orange and 0.85 yellow. Each
        image draws one ratio from this range, biased towards yellow (a Beta(3, 1.5)
        distribution scaled to the range), and each cell varies it by about 0.04.
    full_scale_photons : float
        Expected photon count at intensity 1.0, which sets the shot-noise level: a pixel of
        intensity ``x`` has noise standard deviation ``sqrt(x / full_scale_photons)``.
    read_noise : float
        Standard deviation of additive camera read noise.
    noise_channel_correlation : float
        Correlation in [0, 1] of the noise between colour channels. Demosaicing in colour
        cameras mixes neighbouring pixels, and real yellow-stain images measured 0.65 to
        0.9 between red and green.
    """

    height: int = 1200
    width: int = 1600
    cells_per_image: tuple[int, int] = (5, 40)
    cell_diameter_px: tuple[float, float] = (20.0, 60.0)
    max_elongation: float = 3.0
    touching_pair_fraction: float = 0.2
    cell_brightness: tuple[float, float] = (0.25, 0.75)
    out_of_focus_per_image: tuple[int, int] = (5, 25)
    out_of_focus_brightness: tuple[float, float] = (0.08, 0.5)
    out_of_focus_blur_px: tuple[float, float] = (3.0, 7.0)
    label_min_brightness: float = 0.2
    min_label_area_px: int = 20
    debris_per_image: tuple[int, int] = (50, 200)
    fibres_per_image: tuple[int, int] = (10, 40)
    debris_brightness: tuple[float, float] = (0.03, 0.12)
    background_level: tuple[float, float] = (0.01, 0.03)
    gradient_strength: float = 0.4
    green_to_red: tuple[float, float] = (0.5, 0.85)
    full_scale_photons: float = 1500.0
    read_noise: float = 0.002
    noise_channel_correlation: float = 0.7

    def validate(self) -> None:
        """Raise ValueError naming the first field with an invalid value."""
        if self.height < 16 or self.width < 16:
            raise ValueError(f"height and width must be at least 16 px, got {self.height}x{self.width}.")
        for name in (
            "cells_per_image",
            "cell_diameter_px",
            "cell_brightness",
            "out_of_focus_per_image",
            "out_of_focus_brightness",
            "out_of_focus_blur_px",
            "debris_per_image",
            "fibres_per_image",
            "debris_brightness",
            "background_level",
            "green_to_red",
        ):
            low, high = getattr(self, name)
            if not 0 <= low <= high:
                raise ValueError(f"{name} must be a range (low, high) with 0 <= low <= high, got {(low, high)}.")
        if self.cell_diameter_px[0] < 4:
            raise ValueError(f"cell_diameter_px must start at 4 px or more, got {self.cell_diameter_px}.")
        if self.max_elongation < 1:
            raise ValueError(f"max_elongation must be at least 1, got {self.max_elongation}.")
        if not 0 <= self.touching_pair_fraction <= 1:
            raise ValueError(f"touching_pair_fraction must be in [0, 1], got {self.touching_pair_fraction}.")
        if not 0 <= self.gradient_strength < 1:
            raise ValueError(f"gradient_strength must be in [0, 1), got {self.gradient_strength}.")
        if not 0 <= self.noise_channel_correlation <= 1:
            raise ValueError(
                f"noise_channel_correlation must be in [0, 1], got {self.noise_channel_correlation}."
            )
        if self.full_scale_photons <= 0:
            raise ValueError(f"full_scale_photons must be above 0, got {self.full_scale_photons}.")


@dataclass
class SyntheticSample:
    """A generated image with its ground truth.

    Attributes
    ----------
    image : numpy.ndarray
        uint8 (H, W, 3) RGB image.
    labels : numpy.ndarray
        int32 (H, W) label image, 0 = background, 1..n_cells = labelled cells. Each label
        is one 8-connected component, and different labels never touch, even diagonally.
    n_cells : int
        Number of labelled cells.
    touching_pairs : list of tuple of (int, int)
        Label pairs of cells placed so that they touch in the image.
    n_unlabelled_cells : int
        Out-of-focus cells drawn in the image but too dim to be labelled.
    """

    image: np.ndarray
    labels: np.ndarray
    n_cells: int
    touching_pairs: list[tuple[int, int]] = field(default_factory=list)
    n_unlabelled_cells: int = 0

    @property
    def mask(self) -> np.ndarray:
        """bool (H, W) mask, True for labelled cell pixels."""
        return self.labels > 0


@dataclass
class _Cell:
    """Geometry and appearance of one cell. Angles in radians, lengths in pixels."""

    row: float
    col: float
    semi_major: float
    semi_minor: float
    angle: float
    harmonics: np.ndarray  # rows of (order, amplitude, phase) perturbing the outline
    brightness: float
    blur: float
    colour: np.ndarray
    in_focus: bool

    def radius(self, direction: np.ndarray | float) -> np.ndarray:
        """Distance from the centre to the outline in the given directions (radians)."""
        direction = np.asarray(direction)
        relative = direction - self.angle
        major, minor = self.semi_major, self.semi_minor
        ellipse = (major * minor) / np.sqrt((minor * np.cos(relative)) ** 2 + (major * np.sin(relative)) ** 2)
        factor = np.ones_like(ellipse)
        for order, amplitude, phase in self.harmonics.tolist():
            factor += amplitude * np.cos(order * (direction - phase))
        return ellipse * np.maximum(factor, 0.5)

    @functools.cached_property
    def max_radius(self) -> float:
        """Largest centre-to-outline distance, sampled every 5 degrees."""
        return float(self.radius(_DIRECTIONS).max())


def _sample_cell(
    rng: np.random.Generator,
    config: SyntheticConfig,
    row: float,
    col: float,
    *,
    in_focus: bool,
    image_green: float,
) -> _Cell:
    diameter = rng.uniform(*config.cell_diameter_px)
    # Beta(2, 3) gives a mean axis ratio of 1.8 at the default maximum of 3, with a tail of
    # strongly elongated cells.
    elongation = 1.0 + (config.max_elongation - 1.0) * rng.beta(2.0, 3.0)
    semi_major = diameter / 2 * math.sqrt(elongation)
    semi_minor = diameter / 2 / math.sqrt(elongation)

    # Order 1 makes pear shapes, orders 2 to 5 make angular, irregular outlines.
    harmonics = np.array(
        [
            [1, rng.uniform(0.0, 0.2), rng.uniform(0, 2 * np.pi)],
            [2, rng.normal(0.0, 0.05), rng.uniform(0, 2 * np.pi)],
            [3, rng.normal(0.0, 0.06), rng.uniform(0, 2 * np.pi)],
            [4, rng.normal(0.0, 0.03), rng.uniform(0, 2 * np.pi)],
            [5, rng.normal(0.0, 0.02), rng.uniform(0, 2 * np.pi)],
        ]
    )
    # Cells of one image share a hue, as they share a stain and a camera setting.
    green = float(np.clip(image_green + rng.normal(0.0, 0.04), *config.green_to_red))
    blue = rng.uniform(*_BLUE_TO_RED)
    if in_focus:
        brightness = rng.uniform(*config.cell_brightness)
        blur = rng.uniform(0.6, 1.2)
    else:
        brightness = rng.uniform(*config.out_of_focus_brightness)
        blur = rng.uniform(*config.out_of_focus_blur_px)
    return _Cell(
        row=row,
        col=col,
        semi_major=semi_major,
        semi_minor=semi_minor,
        angle=rng.uniform(0, np.pi),
        harmonics=harmonics,
        brightness=brightness,
        blur=blur,
        colour=np.array([1.0, green, blue], dtype=np.float32),
        in_focus=in_focus,
    )


def _render_cell(cell: _Cell, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Render one cell into a patch.

    Returns the intensity patch float32 (h, w), the outline mask patch bool (h, w), and the
    image row and column of the patch's top-left corner.
    """
    tail_length = cell.max_radius * rng.uniform(0.4, 1.2) if cell.in_focus and rng.random() < 0.5 else 0.0
    # In-focus cells get a glow of scattered light 4 times wider than their blur. The patch
    # reaches 3 sigma past the outline so that no blur is cut off at the patch border.
    glow_sigma = 4.0 * cell.blur if cell.in_focus else 0.0
    half = math.ceil(cell.max_radius + tail_length + 3 * max(cell.blur, glow_sigma) + 3)
    centre_row, centre_col = round(cell.row), round(cell.col)
    offsets = np.arange(-half, half + 1, dtype=np.float32)
    dy = offsets[:, None] + (centre_row - cell.row)
    dx = offsets[None, :] + (centre_col - cell.col)
    distance = np.hypot(dy, dx)
    direction = np.arctan2(dy, dx)
    outline = cell.radius(direction).astype(np.float32)
    relative = distance / outline

    # Filled outline with a one-pixel anti-aliased edge, slightly brighter in the middle.
    coverage = np.clip(outline - distance + 0.5, 0.0, 1.0)
    intensity = coverage * (1.0 - 0.3 * np.minimum(relative, 1.0) ** 2)

    # A darker, off-centre nucleus in about 70 % of the cells.
    if rng.random() < 0.7:
        shift = rng.uniform(0.0, 0.25) * cell.semi_minor
        theta = rng.uniform(0, 2 * np.pi)
        nucleus_radius = rng.uniform(0.3, 0.45) * cell.semi_minor
        nucleus_distance = np.hypot(dy - shift * math.sin(theta), dx - shift * math.cos(theta))
        nucleus = np.clip(nucleus_radius - nucleus_distance + 1.5, 0.0, 3.0) / 3.0
        intensity = intensity * (1.0 - rng.uniform(0.3, 0.6) * nucleus)

    # Granular cytoplasm: multiplicative noise correlated over about 2 px.
    grain = cv2.GaussianBlur(rng.standard_normal(intensity.shape, dtype=np.float32), (0, 0), 0.8)
    grain /= max(float(grain.std()), 1e-6)
    intensity = intensity * np.clip(1.0 + rng.uniform(0.12, 0.3) * grain, 0.0, None)

    # Bright granules of stain, about 2 px across, scattered over the cell body.
    body = np.flatnonzero(relative.ravel() < 0.9)
    if body.size:
        granules = np.zeros(intensity.size, dtype=np.float32)
        n_granules = int(rng.integers(0, max(2, body.size // 60)))
        granules[rng.choice(body, size=n_granules)] = rng.uniform(0.3, 0.8, n_granules) * (2 * np.pi)
        intensity = intensity + cv2.GaussianBlur(granules.reshape(intensity.shape), (0, 0), 1.0)

    # A tapering process (dendrite stump) leaving the cell near one end of its long axis: a
    # cone whose half-width shrinks from its base to 0.5 px and whose intensity fades to 30 %.
    # The process is drawn but not labelled, except where it lies inside the outline.
    if tail_length > 0:
        heading = cell.angle + rng.choice([0.0, np.pi]) + rng.normal(0.0, 0.3)
        start = float(cell.radius(heading)) * 0.7
        along = dx * math.cos(heading) + dy * math.sin(heading) - start
        across = np.abs(dy * math.cos(heading) - dx * math.sin(heading))
        fraction = np.clip(along / tail_length, 0.0, 1.0)
        base_half_width = rng.uniform(0.25, 0.5) * cell.semi_minor
        half_width = 0.5 + (base_half_width - 0.5) * (1.0 - fraction)
        inside = (along > 0) & (along < tail_length)
        tail = np.where(inside, np.clip(half_width - across + 0.5, 0.0, 1.0), 0.0) * (1.0 - 0.7 * fraction)
        intensity = np.maximum(intensity, 0.8 * tail)

    # Point-spread function: a sharp core plus, in focus, a faint glow of scattered light.
    intensity = cv2.GaussianBlur(intensity.astype(np.float32), (0, 0), cell.blur)
    if glow_sigma > 0:
        intensity = intensity * 0.85 + cv2.GaussianBlur(intensity, (0, 0), glow_sigma) * 0.25
    intensity *= cell.brightness
    return intensity, relative < 1.0, centre_row - half, centre_col - half


def _paste(
    target: np.ndarray, patch: np.ndarray, top: int, left: int
) -> tuple[np.ndarray, tuple[slice, slice]] | None:
    """Clip a patch to the target's bounds and return the visible part and the target slices."""
    height, width = target.shape[:2]
    row0, col0 = max(top, 0), max(left, 0)
    row1, col1 = min(top + patch.shape[0], height), min(left + patch.shape[1], width)
    if row0 >= row1 or col0 >= col1:
        return None
    visible = patch[row0 - top : row1 - top, col0 - left : col1 - left]
    return visible, (slice(row0, row1), slice(col0, col1))


def _smooth_field(rng: np.random.Generator, height: int, width: int, cell_px: int) -> np.ndarray:
    """Return a zero-mean, unit-variance random field that varies over about ``cell_px`` pixels."""
    grid = rng.standard_normal((max(2, height // cell_px + 2), max(2, width // cell_px + 2)), dtype=np.float32)
    field_ = cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)
    return (field_ - field_.mean()) / max(float(field_.std()), 1e-6)


def _illumination(rng: np.random.Generator, config: SyntheticConfig) -> np.ndarray:
    """Return a multiplicative illumination field float32 (H, W), a linear ramp plus vignetting."""
    height, width = config.height, config.width
    # The field is smooth, so it is computed on a grid 8 times coarser and then enlarged.
    rows = np.linspace(-0.5, 0.5, height // 8 + 2, dtype=np.float32)[:, None]
    cols = np.linspace(-0.5, 0.5, width // 8 + 2, dtype=np.float32)[None, :]
    heading = rng.uniform(0, 2 * np.pi)
    ramp = math.cos(heading) * cols + math.sin(heading) * rows
    centre_row, centre_col = rng.uniform(-0.2, 0.2, size=2)
    vignette = (rows - centre_row) ** 2 + (cols - centre_col) ** 2
    strength = config.gradient_strength
    coarse = np.clip(1.0 + strength * ramp - strength * (vignette - 0.15), 0.2, None).astype(np.float32)
    return cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)


def _draw_debris(rng: np.random.Generator, config: SyntheticConfig) -> np.ndarray:
    """Draw faint unlabelled dots and fibres and return their float32 (H, W) intensity."""
    height, width = config.height, config.width
    layer = np.zeros((height, width), dtype=np.float32)

    for _ in range(int(rng.integers(config.debris_per_image[0], config.debris_per_image[1] + 1))):
        centre = (int(rng.integers(0, width)), int(rng.integers(0, height)))
        cv2.circle(layer, centre, int(rng.integers(1, 4)), float(rng.uniform(*config.debris_brightness)), -1)

    for _ in range(int(rng.integers(config.fibres_per_image[0], config.fibres_per_image[1] + 1))):
        n_points = int(rng.integers(10, 60))
        headings = rng.uniform(0, 2 * np.pi) + np.cumsum(rng.normal(0.0, 0.25, n_points))
        steps = rng.uniform(4.0, 10.0, n_points)
        xs = rng.uniform(0, width) + np.cumsum(steps * np.cos(headings))
        ys = rng.uniform(0, height) + np.cumsum(steps * np.sin(headings))
        points = np.stack([xs, ys], axis=1).round().astype(np.int32)
        value = float(rng.uniform(*config.debris_brightness)) * 0.5
        cv2.polylines(layer, [points], isClosed=False, color=value, thickness=1)

    return cv2.GaussianBlur(layer, (0, 0), 1.2)


def _place_cells(rng: np.random.Generator, config: SyntheticConfig) -> tuple[list[_Cell], list[tuple[int, int]]]:
    """Place in-focus cells, their touching partners and out-of-focus cells without overlaps.

    Returns the cells and index pairs of touching cells.
    """
    cells: list[_Cell] = []
    pairs: list[tuple[int, int]] = []
    height, width = config.height, config.width
    low, high = config.green_to_red
    image_green = low + (high - low) * rng.beta(3.0, 1.5)

    def fits(candidate: _Cell, ignore: int | None = None) -> bool:
        for index, other in enumerate(cells):
            if index == ignore:
                continue
            gap = math.hypot(candidate.row - other.row, candidate.col - other.col)
            if gap < candidate.max_radius + other.max_radius + 4:
                return False
        return True

    def place(in_focus: bool) -> int | None:
        for _ in range(50):
            row, col = rng.uniform(0, height), rng.uniform(0, width)
            cell = _sample_cell(rng, config, row, col, in_focus=in_focus, image_green=image_green)
            if fits(cell):
                cells.append(cell)
                return len(cells) - 1
        return None

    n_in_focus = int(rng.integers(config.cells_per_image[0], config.cells_per_image[1] + 1))
    for _ in range(n_in_focus):
        first = place(in_focus=True)
        if first is None or rng.random() >= config.touching_pair_fraction:
            continue
        anchor = cells[first]
        partner = _sample_cell(rng, config, 0.0, 0.0, in_focus=True, image_green=image_green)
        heading = rng.uniform(0, 2 * np.pi)
        # Centre distance that makes the outlines meet along the heading, minus an overlap of
        # up to 3 px (a negative overlap leaves a 1 px gap that the blur closes in the image).
        distance = float(anchor.radius(heading)) + float(partner.radius(heading + np.pi)) - rng.uniform(-1.0, 3.0)
        partner.row = anchor.row + distance * math.sin(heading)
        partner.col = anchor.col + distance * math.cos(heading)
        inside = 0 <= partner.row < height and 0 <= partner.col < width
        if inside and fits(partner, ignore=first):
            cells.append(partner)
            pairs.append((first, len(cells) - 1))

    n_out_of_focus = int(rng.integers(config.out_of_focus_per_image[0], config.out_of_focus_per_image[1] + 1))
    for _ in range(n_out_of_focus):
        place(in_focus=False)
    return cells, pairs


def _keep_largest_components(labels: np.ndarray) -> np.ndarray:
    """Cut every label down to its largest 8-connected component. Modifies ``labels``."""
    components, _ = ndimage.label(labels > 0, structure=_EIGHT_CONNECTED)
    cell_pixels = labels > 0
    pairs, counts = np.unique(
        np.stack([labels[cell_pixels], components[cell_pixels]]), axis=1, return_counts=True
    )
    label_of_pair, component_of_pair = pairs
    components_per_label = np.bincount(label_of_pair)
    split_labels = np.flatnonzero(components_per_label > 1)
    for label in split_labels:
        own = label_of_pair == label
        keep = component_of_pair[own][np.argmax(counts[own])]
        labels[(labels == label) & (components != keep)] = 0
    return labels


def _render_cells(
    cells: list[_Cell], rng: np.random.Generator, config: SyntheticConfig
) -> tuple[np.ndarray, np.ndarray, dict[int, int], int]:
    """Draw the cells.

    Returns the signal float32 (3, H, W) in planar RGB order, the raw labels int32 (H, W),
    the label of each labelled cell index, and the number of cells too dim to label.
    """
    signal = np.zeros((3, config.height, config.width), dtype=np.float32)
    labels = np.zeros((config.height, config.width), dtype=np.int32)
    label_of_cell: dict[int, int] = {}
    n_unlabelled = 0
    for index, cell in enumerate(cells):
        intensity, outline, top, left = _render_cell(cell, rng)
        pasted = _paste(labels, intensity, top, left)
        if pasted is None:
            continue
        visible, region = pasted
        signal[(slice(None), *region)] += visible[None] * cell.colour[:, None, None]

        if float(intensity.max()) < config.label_min_brightness:
            n_unlabelled += 1
            continue
        label = len(label_of_cell) + 1
        label_of_cell[index] = label
        visible_outline, _ = _paste(labels, outline, top, left)
        target = labels[region]
        target[visible_outline & (target == 0)] = label
    return signal, labels, label_of_cell, n_unlabelled


def _finalise_labels(labels: np.ndarray, n_labels: int, min_area: int) -> tuple[np.ndarray, np.ndarray]:
    """Separate touching labels, drop small ones and renumber the rest 1..N in order.

    Returns the new label image and the table mapping each old label to its new one
    (0 for dropped labels).
    """
    # Touching cells lose their contact pixels so that they stay separate components.
    labels = _remove_label_contacts(labels)
    _, n_components = ndimage.label(labels > 0, structure=_EIGHT_CONNECTED)
    areas = np.bincount(labels.ravel(), minlength=n_labels + 1)
    if n_components != np.count_nonzero(areas[1:]):
        labels = _keep_largest_components(labels)
        areas = np.bincount(labels.ravel(), minlength=n_labels + 1)

    kept_labels = np.flatnonzero(areas[1:] >= min_area) + 1
    renumber = np.zeros(n_labels + 1, dtype=np.int32)
    renumber[kept_labels] = np.arange(1, len(kept_labels) + 1, dtype=np.int32)
    return renumber[labels], renumber


def _compose_image(signal: np.ndarray, rng: np.random.Generator, config: SyntheticConfig) -> np.ndarray:
    """Add background, debris, illumination and noise to planar cell signal and return uint8 (H, W, 3)."""
    height, width = config.height, config.width
    background_level = rng.uniform(*config.background_level)
    autofluorescence = 1.0 + 0.2 * _smooth_field(rng, height, width, 200)
    autofluorescence += 0.15 * _smooth_field(rng, height, width, 24)
    np.clip(autofluorescence, 0.0, None, out=autofluorescence)
    autofluorescence *= background_level
    debris = _draw_debris(rng, config)
    debris_colour = (1.0, rng.uniform(*config.green_to_red), 0.05)
    illumination = _illumination(rng, config)

    # Shot noise has the Poisson variance, the expected photon count, plus read noise. The
    # Gaussian form is used because numpy 2.4's Poisson sampler took about 6 times as long
    # as its normal sampler on a 1600x1200x3 image.
    photons = config.full_scale_photons
    read_variance = config.read_noise**2
    shared_noise = rng.standard_normal((height, width), dtype=np.float32)
    shared_noise *= math.sqrt(config.noise_channel_correlation)
    own_weight = math.sqrt(1.0 - config.noise_channel_correlation)
    planes = []
    for channel in range(3):
        plane = signal[channel]
        plane += autofluorescence * _BACKGROUND_COLOUR[channel]
        plane += debris * debris_colour[channel]
        plane *= illumination
        sigma = np.maximum(plane, 0.0) * (1.0 / photons)
        sigma += read_variance
        np.sqrt(sigma, out=sigma)
        noise = rng.standard_normal((height, width), dtype=np.float32)
        noise *= own_weight
        noise += shared_noise
        sigma *= noise
        plane += sigma
        plane *= 255.0
        plane += 0.5
        np.clip(plane, 0.0, 255.0, out=plane)
        planes.append(plane.astype(np.uint8))
    return cv2.merge(planes)


def generate_labelled_sample(seed: int, config: SyntheticConfig | None = None) -> SyntheticSample:
    """Generate a synthetic image with its label image and cell count.

    Parameters
    ----------
    seed : int
        Seed. The same seed and config give the same sample.
    config : SyntheticConfig or None
        Generator parameters, or None for the defaults (1600x1200 px).

    Returns
    -------
    SyntheticSample
        uint8 RGB image, int32 labels (0 = background) and metadata.

    Raises
    ------
    ValueError
        If a config field is invalid.
    """
    config = config or SyntheticConfig()
    config.validate()
    rng = np.random.default_rng(seed)

    cells, pairs = _place_cells(rng, config)
    signal, raw_labels, label_of_cell, n_unlabelled = _render_cells(cells, rng, config)
    labels, renumber = _finalise_labels(raw_labels, len(label_of_cell), config.min_label_area_px)

    touching = []
    for first, second in pairs:
        new_first = renumber[label_of_cell[first]] if first in label_of_cell else 0
        new_second = renumber[label_of_cell[second]] if second in label_of_cell else 0
        if new_first and new_second:
            touching.append((int(new_first), int(new_second)))

    return SyntheticSample(
        image=_compose_image(signal, rng, config),
        labels=labels,
        n_cells=int(labels.max()),
        touching_pairs=touching,
        n_unlabelled_cells=n_unlabelled,
    )


def generate_sample(seed: int, config: SyntheticConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Generate a synthetic image and its mask.

    Parameters
    ----------
    seed : int
        Seed. The same seed and config give the same pair.
    config : SyntheticConfig or None
        Generator parameters, or None for the defaults (1600x1200 px).

    Returns
    -------
    tuple of (numpy.ndarray, numpy.ndarray)
        Raw image uint8 (H, W, 3) RGB and mask bool (H, W), True for labelled cells. Each
        labelled cell is one 8-connected component. Use :func:`generate_labelled_sample`
        for the label image and cell count.
    """
    sample = generate_labelled_sample(seed, config)
    return sample.image, sample.mask


def _image_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, index]).generate_state(1)[0])


def _write_png(path: Path, array: np.ndarray) -> None:
    if array.ndim == 3:
        array = array[:, :, ::-1]  # OpenCV writes BGR order
    # The hidden temporary name keeps list_samples from picking up a half-written file.
    temporary = path.with_name(f".{path.stem}.partial.png")
    if not cv2.imwrite(str(temporary), array):
        raise OSError(f"{temporary}: writing the PNG failed. Check that the folder is writable.")
    temporary.replace(path)


def write_synthetic_dataset(
    dest: Path | str, n_images: int = 16, seed: int = 0, config: SyntheticConfig | None = None
) -> Path:
    """Write a synthetic dataset with ``images/`` and ``masks/`` subfolders.

    Parameters
    ----------
    dest : pathlib.Path or str
        Dataset folder, created if missing.
    n_images : int
        Number of image and mask pairs, at least 1.
    seed : int
        Base seed. Image ``i`` uses a seed derived from ``(seed, i)``.
    config : SyntheticConfig or None
        Generator parameters, or None for the defaults.

    Returns
    -------
    pathlib.Path
        ``dest``, holding ``images/synth_000.png`` ... (uint8 RGB) and ``masks/synth_000.png``
        ... (uint8, 0 background and 255 cells), readable by
        ``ccflow.data.list_samples(dest, require_masks=True)``, plus ``synthetic.json`` with
        the parameters and per-image cell counts.

    Notes
    -----
    If ``synthetic.json`` records the same parameters and generator version and every file
    exists, nothing is written. Otherwise older ``synth_NNN.png`` files are removed and the
    set is written again. Other files in ``dest`` are left alone.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be at least 1, got {n_images}.")
    dest = Path(dest)
    config = config or SyntheticConfig()
    config.validate()
    names = [f"synth_{index:03d}.png" for index in range(n_images)]
    parameters = {
        "generator_version": GENERATOR_VERSION,
        "seed": seed,
        "n_images": n_images,
        "config": asdict(config),
    }

    manifest_path = dest / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            logger.warning("%s: unreadable manifest (%s), writing the dataset again", manifest_path, error)
            manifest = {}
        recorded = {key: manifest.get(key) for key in parameters}
        complete = all((dest / folder / name).is_file() for folder in ("images", "masks") for name in names)
        if recorded == json.loads(json.dumps(parameters)) and complete:
            logger.info("%s: synthetic dataset of %d images already present, skipping", dest, n_images)
            return dest

    images_dir = dest / "images"
    masks_dir = dest / "masks"
    images_dir.mkdir(parents=True, exist_ok=True)
    masks_dir.mkdir(parents=True, exist_ok=True)
    manifest_path.unlink(missing_ok=True)
    for folder in (images_dir, masks_dir):
        for path in folder.iterdir():
            if _FILE_PATTERN.match(path.name):
                path.unlink()

    counts = {}
    for index, name in enumerate(names):
        sample = generate_labelled_sample(_image_seed(seed, index), config)
        _write_png(images_dir / name, sample.image)
        _write_png(masks_dir / name, sample.mask.astype(np.uint8) * np.uint8(255))
        counts[Path(name).stem] = sample.n_cells
    logger.info("%s: wrote %d synthetic images", dest, n_images)

    manifest_path.write_text(json.dumps({**parameters, "cell_counts": counts}, indent=2) + "\n")
    return dest
