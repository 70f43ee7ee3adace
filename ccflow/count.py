"""Count the cells of images into CSV rows and overlay PNGs.

:func:`count_image` is the per-image step shared by the in-process loop
:func:`count_folder` and the Ray Data job of :mod:`ccflow.batch`. Both write:

- ``counts.csv``: one row per image (file, count, mean foreground probability, width,
  height, status, error);
- ``cells.csv``: one row per cell (file, cell id, centroid x and y, area and equivalent
  diameter in original pixels, mean probability);
- ``overlays/<image name without suffix>.png``: cell outlines and the Grad-CAM heatmap
  over the image.

Before counting, each image is checked against the ``counting`` suite of
:mod:`ccflow.validation`, in one Great Expectations run per batch of images. A file that
cannot be read or counted gets a row with status ``error`` and the reason. An image that
decodes but fails an expectation (blank, blurred, saturated, wrong size or format) gets
status ``invalid`` with the failed expectations in ``error`` and is not counted. The other
images are still counted, and an optional :class:`~ccflow.drift.DriftAccumulator`
collects the drift features of each counted image.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from skimage.io import imsave
from tqdm import tqdm

from ccflow.counter import CellCounter
from ccflow.data import IMAGE_SUFFIXES, decode_image
from ccflow.drift import DriftAccumulator
from ccflow.errors import CcflowError, DatasetError
from ccflow.postprocess import MEASURE_COLUMNS
from ccflow.validation import ImageValidator, image_metadata

logger = logging.getLogger(__name__)

ImageStatus = Literal["ok", "error", "invalid", "skipped"]
"""Outcome of one image. ``ok``: counted. ``error``: unreadable, or failed while counting.
``invalid``: decoded but failed an expectation of the ``counting`` suite, so not counted.
``skipped``: left out on purpose. :func:`count_images` sets all but ``skipped``."""

STAGES = ("decode", "validate", "count", "drift")
"""Stages that :func:`count_images` times per image, in :attr:`ImageOutcome.seconds`."""

COUNTS_COLUMNS = ["file", "count", "mean_probability", "width", "height", "status", "error"]
CELLS_COLUMNS = ["file", *MEASURE_COLUMNS]


@dataclass
class ImageOutcome:
    """Result of :func:`count_image` for one image.

    Attributes
    ----------
    row : dict
        The ``counts.csv`` row, keys of :data:`COUNTS_COLUMNS`.
    cells : list of dict
        The ``cells.csv`` rows, keys of :data:`CELLS_COLUMNS`; empty unless ``ok``.
    overlay : ndarray, uint8, shape (H, W, 3), or None
        Overlay image when requested and counted.
    seconds : dict of str to float
        Wall time of the stages in :data:`STAGES` that ran. A batch's Great
        Expectations run is shared equally among its images.
    """

    row: dict
    cells: list[dict] = field(default_factory=list)
    overlay: np.ndarray | None = None
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def status(self) -> ImageStatus:
        return self.row["status"]


@dataclass
class CountSummary:
    """Totals of one counting job: ``failed`` images are unreadable or failed while
    counting, ``invalid`` ones failed an expectation and were not counted."""

    images: int
    counted: int
    failed: int
    cells: int
    seconds: float
    output_dir: Path
    invalid: int = 0


def count_image(
    counter: CellCounter,
    data: bytes,
    name: str,
    *,
    overlay: bool = True,
    validator: ImageValidator | None = None,
    drift: DriftAccumulator | None = None,
) -> ImageOutcome:
    """Decode, check and count one encoded image, turning failures into a row.

    A shortcut for :func:`count_images` on one image; prefer that function for many
    images, because it checks a whole batch in one Great Expectations run.

    Parameters
    ----------
    counter : CellCounter
        Model and post-processing.
    data : bytes
        Content of a PNG or TIFF file (8- or 16-bit, grey, RGB or multi-channel).
    name : str
        Name written to the ``file`` column and used in messages.
    overlay : bool
        Also render the overlay with outlines and the Grad-CAM heatmap.
    validator : ImageValidator, optional
        Suite to check the image against before counting; None counts without a check.
    drift : DriftAccumulator, optional
        Updated with the image and its label image when the image is counted.

    Returns
    -------
    ImageOutcome
        Status ``ok`` with the count, ``error`` with ``"<ExceptionType>: <message>"``, or
        ``invalid`` with the failed expectations joined by ``"; "``.
    """
    return count_images(counter, [(name, data)], overlay=overlay, validator=validator, drift=drift)[0]


def count_images(
    counter: CellCounter,
    items: Sequence[tuple[str, bytes]],
    *,
    overlay: bool = True,
    validator: ImageValidator | None = None,
    drift: DriftAccumulator | None = None,
) -> list[ImageOutcome]:
    """Decode, check and count a batch of encoded images, turning failures into rows.

    The images are decoded first. The decoded ones are measured and checked against
    ``validator`` in one Great Expectations run. The valid ones are then counted, and
    each counted image is added to ``drift`` with its label image.

    Parameters
    ----------
    counter : CellCounter
        Model and post-processing.
    items : sequence of (str, bytes)
        Name and file content of each image, as :func:`count_image` takes them. The
        decoded images of the whole batch are held in memory at once.
    overlay : bool
        Also render the overlay of each counted image.
    validator : ImageValidator, optional
        Suite to check the images against; None counts every image that decodes.
    drift : DriftAccumulator, optional
        Updated with each counted image (raw) and its label image.

    Returns
    -------
    list of ImageOutcome
        One per item, in order. A file that does not decode is an ``error``, with or
        without a validator, so the status of a damaged file does not depend on
        whether validation runs.

    Raises
    ------
    ccflow.validation.SuiteError
        If the suite cannot be evaluated on the metadata rows. Such a fault lies in the
        suite files, not in an image, so the whole batch stops.
    """
    outcomes: list[ImageOutcome] = []
    images: list[np.ndarray | None] = []
    for name, data in items:
        outcome, image = _decode(data, name)
        outcomes.append(outcome)
        images.append(image)

    if validator is not None:
        _validate(validator, items, images, outcomes)

    for (name, _), image, outcome in zip(items, images, outcomes, strict=True):
        if image is not None and outcome.status == "ok":
            _count_decoded(counter, image, name, outcome, overlay=overlay, drift=drift)
    return outcomes


def _decode(data: bytes, name: str) -> tuple[ImageOutcome, np.ndarray | None]:
    outcome = ImageOutcome(row={"file": name, "status": "ok", "error": ""})
    started = time.perf_counter()
    try:
        image = decode_image(data, name)
    except (CcflowError, OSError, ValueError, RuntimeError) as error:
        _set_error(outcome, error, name)
        image = None
    else:
        # Also on the rows of invalid images, whose size is often what is wrong.
        outcome.row.update(width=int(image.shape[1]), height=int(image.shape[0]))
    outcome.seconds["decode"] = time.perf_counter() - started
    return outcome, image


def _validate(
    validator: ImageValidator,
    items: Sequence[tuple[str, bytes]],
    images: list[np.ndarray | None],
    outcomes: list[ImageOutcome],
) -> None:
    """Mark the decoded images that fail an expectation as ``invalid`` and drop their pixels."""
    started = time.perf_counter()
    decoded = [index for index, image in enumerate(images) if image is not None]
    if not decoded:
        return
    rows = []
    for index in decoded:
        name, data = items[index]
        row, _ = image_metadata(name, data, image=images[index])
        rows.append(row)
    failures = validator.failures(pd.DataFrame(rows))

    share = (time.perf_counter() - started) / len(decoded)
    for index, failed in zip(decoded, failures, strict=True):
        outcomes[index].seconds["validate"] = share
        if failed:
            outcomes[index].row.update(status="invalid", error="; ".join(failed))
            images[index] = None
            logger.warning("%s is invalid and not counted: %s", items[index][0], "; ".join(failed))


def _count_decoded(
    counter: CellCounter,
    image: np.ndarray,
    name: str,
    outcome: ImageOutcome,
    *,
    overlay: bool,
    drift: DriftAccumulator | None,
) -> None:
    started = time.perf_counter()
    try:
        result = counter.count(image, explain=overlay)
    except (CcflowError, OSError, ValueError, RuntimeError) as error:
        _set_error(outcome, error, name)
        return
    finally:
        outcome.seconds["count"] = time.perf_counter() - started

    height, width = result.labels.shape
    outcome.row.update(
        count=result.count,
        mean_probability=_round(result.mean_probability),
        width=width,
        height=height,
    )
    outcome.cells = [
        {"file": name, **{key: _round(value) for key, value in cell.items()}}
        for cell in result.cells.to_dict(orient="records")
    ]
    outcome.overlay = result.overlay
    logger.info("%s: %d cells", name, result.count)

    if drift is not None:
        started = time.perf_counter()
        drift.update(image, result.labels)
        outcome.seconds["drift"] = time.perf_counter() - started


def _set_error(outcome: ImageOutcome, error: Exception, name: str) -> None:
    outcome.row.update(status="error", error=f"{type(error).__name__}: {error}")
    logger.error("Could not count %s: %s", name, error)


def overlay_name(name: str) -> str:
    """Return the path of an image's overlay under the output, ``overlays/<name without suffix>.png``."""
    stem = name.rsplit(".", 1)[0] if "." in name.rsplit("/", 1)[-1] else name
    return f"overlays/{stem}.png"


def list_images(input_dir: Path) -> list[Path]:
    """Return the image files of a folder (or of its ``images/`` subfolder), sorted.

    Raises
    ------
    ccflow.errors.DatasetError
        The folder does not exist or contains no PNG or TIFF files.
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise DatasetError(f"Input folder not found: {input_dir}. Pass a folder of images.")
    folder = input_dir / "images" if (input_dir / "images").is_dir() else input_dir
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise DatasetError(
            f"No images found in {folder}: expected files ending in {', '.join(IMAGE_SUFFIXES)}."
        )
    return paths


def count_folder(
    input_dir: Path,
    output_dir: Path,
    counter: CellCounter,
    *,
    overlays: bool = True,
    validate: bool = True,
    drift: DriftAccumulator | None = None,
    batch_size: int = 8,
) -> CountSummary:
    """Count every image of ``input_dir`` in this process and write the results to ``output_dir``.

    This is the plain loop without Ray, ledger or buckets; :func:`ccflow.batch.run_count_job`
    is the job behind ``ccflow count``.

    Parameters
    ----------
    input_dir : Path
        Folder of PNG or TIFF images (or a dataset folder with ``images/``).
    output_dir : Path
        Created if missing; existing ``counts.csv`` and ``cells.csv`` are replaced.
    counter : CellCounter
        Model and post-processing, usually from :func:`ccflow.registry.load_counter`.
    overlays : bool
        Write an overlay PNG with outlines and the Grad-CAM heatmap for each image.
    validate : bool
        Check each image against the ``counting`` suite and leave invalid ones uncounted.
    drift : DriftAccumulator, optional
        Updated with every counted image; score it with :meth:`DriftAccumulator.report`.
    batch_size : int
        Images decoded, held in memory and checked in one Great Expectations run at a time.

    Returns
    -------
    CountSummary
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}.")
    paths = list_images(input_dir)
    output_dir = Path(output_dir)
    (output_dir / "overlays").mkdir(parents=True, exist_ok=True)
    validator = ImageValidator("counting") if validate else None

    started = time.monotonic()
    totals = dict.fromkeys(("ok", "error", "invalid", "skipped"), 0)
    total_cells = 0
    with (
        open(output_dir / "counts.csv", "w", newline="") as counts_file,
        open(output_dir / "cells.csv", "w", newline="") as cells_file,
        tqdm(total=len(paths), desc="images", unit="image") as progress,
    ):
        counts_writer = csv.DictWriter(counts_file, COUNTS_COLUMNS)
        cells_writer = csv.DictWriter(cells_file, CELLS_COLUMNS)
        counts_writer.writeheader()
        cells_writer.writeheader()
        for first in range(0, len(paths), batch_size):
            batch = paths[first : first + batch_size]
            for path, outcome in zip(batch, _count_files(counter, batch, overlays, validator, drift), strict=True):
                totals[outcome.status] += 1
                if outcome.status == "ok":
                    total_cells += outcome.row["count"]
                cells_writer.writerows(outcome.cells)
                if outcome.overlay is not None:
                    imsave(output_dir / overlay_name(path.name), outcome.overlay, check_contrast=False)
                counts_writer.writerow(outcome.row)
            # Flushed per batch so an interrupted job keeps every finished row.
            counts_file.flush()
            cells_file.flush()
            progress.update(len(batch))

    summary = CountSummary(
        images=len(paths),
        counted=totals["ok"],
        failed=totals["error"],
        invalid=totals["invalid"],
        cells=total_cells,
        seconds=time.monotonic() - started,
        output_dir=output_dir,
    )
    logger.info(
        "Counted %d of %d images (%d failed, %d invalid, %d cells) in %.1f s; results in %s",
        summary.counted, len(paths), summary.failed, summary.invalid, total_cells, summary.seconds, output_dir,
    )
    return summary


def _count_files(
    counter: CellCounter,
    paths: list[Path],
    overlays: bool,
    validator: ImageValidator | None,
    drift: DriftAccumulator | None,
) -> list[ImageOutcome]:
    """Read and count a batch of files, giving an error outcome to each file that cannot be read."""
    outcomes: dict[int, ImageOutcome] = {}
    items: list[tuple[str, bytes]] = []
    readable: list[int] = []
    for index, path in enumerate(paths):
        try:
            items.append((path.name, path.read_bytes()))
            readable.append(index)
        except OSError as error:
            outcomes[index] = ImageOutcome(
                row={"file": path.name, "status": "error", "error": f"{type(error).__name__}: {error}"}
            )
            logger.error("Could not read %s: %s", path, error)
    counted = count_images(counter, items, overlay=overlays, validator=validator, drift=drift)
    outcomes.update(zip(readable, counted, strict=True))
    return [outcomes[index] for index in range(len(paths))]


def _round(value):
    return round(value, 4) if isinstance(value, float) else value
