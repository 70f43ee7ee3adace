"""Count the cells of images into CSV rows and overlay PNGs.

:func:`count_image` is the per-image step shared by the in-process loop
:func:`count_folder` and the Ray Data job of :mod:`ccflow.batch`. Both write:

- ``counts.csv``: one row per image (file, count, mean foreground probability, width,
  height, status, error);
- ``cells.csv``: one row per cell (file, cell id, centroid x and y, area and equivalent
  diameter in original pixels, mean probability);
- ``overlays/<image name without suffix>.png``: cell outlines and the Grad-CAM heatmap
  over the image.

A file that cannot be read or counted gets a row with status ``error`` and the reason;
the other images are still counted.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from skimage.io import imsave
from tqdm import tqdm

from ccflow.counter import CellCounter
from ccflow.data import IMAGE_SUFFIXES, decode_image
from ccflow.errors import CcflowError, DatasetError
from ccflow.postprocess import MEASURE_COLUMNS

logger = logging.getLogger(__name__)

ImageStatus = Literal["ok", "error", "invalid", "skipped"]
"""Outcome of one image: ``ok`` counted; ``error`` unreadable or failed while counting;
``invalid`` rejected by an image check before counting; ``skipped`` left out on purpose by
an image check. :func:`count_image` itself sets only ``ok`` and ``error``."""

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
        Wall time of the ``decode`` and ``count`` stages.
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
    """Totals of one counting job."""

    images: int
    counted: int
    failed: int
    cells: int
    seconds: float
    output_dir: Path


def count_image(counter: CellCounter, data: bytes, name: str, *, overlay: bool = True) -> ImageOutcome:
    """Decode one encoded image and count its cells, turning failures into an error row.

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

    Returns
    -------
    ImageOutcome
        Status ``ok`` with the count, or ``error`` with ``"<ExceptionType>: <message>"``.
    """
    row = {"file": name, "status": "ok", "error": ""}
    seconds: dict[str, float] = {}
    try:
        started = time.perf_counter()
        image = decode_image(data, name)
        seconds["decode"] = time.perf_counter() - started

        # Image checks (validation, feature collection for drift) belong here, between
        # decoding and counting: they see the raw image and can set the row's status.

        started = time.perf_counter()
        result = counter.count(image, explain=overlay)
        seconds["count"] = time.perf_counter() - started
    except (CcflowError, OSError, ValueError, RuntimeError) as error:
        row.update(status="error", error=f"{type(error).__name__}: {error}")
        logger.error("Could not count %s: %s", name, error)
        return ImageOutcome(row=row, seconds=seconds)

    height, width = result.labels.shape
    row.update(
        count=result.count,
        mean_probability=_round(result.mean_probability),
        width=width,
        height=height,
    )
    cells = [
        {"file": name, **{key: _round(value) for key, value in cell.items()}}
        for cell in result.cells.to_dict(orient="records")
    ]
    logger.info("%s: %d cells", name, result.count)
    return ImageOutcome(row=row, cells=cells, overlay=result.overlay, seconds=seconds)


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

    Returns
    -------
    CountSummary
    """
    paths = list_images(input_dir)
    output_dir = Path(output_dir)
    (output_dir / "overlays").mkdir(parents=True, exist_ok=True)

    started = time.monotonic()
    counted = failed = total_cells = 0
    with (
        open(output_dir / "counts.csv", "w", newline="") as counts_file,
        open(output_dir / "cells.csv", "w", newline="") as cells_file,
    ):
        counts_writer = csv.DictWriter(counts_file, COUNTS_COLUMNS)
        cells_writer = csv.DictWriter(cells_file, CELLS_COLUMNS)
        counts_writer.writeheader()
        cells_writer.writeheader()
        for path in tqdm(paths, desc="images", unit="image"):
            try:
                data = path.read_bytes()
            except OSError as error:
                outcome = ImageOutcome(
                    row={"file": path.name, "status": "error", "error": f"{type(error).__name__}: {error}"}
                )
                logger.error("Could not read %s: %s", path, error)
            else:
                outcome = count_image(counter, data, path.name, overlay=overlays)

            if outcome.status == "ok":
                counted += 1
                total_cells += outcome.row["count"]
            else:
                failed += 1
            cells_writer.writerows(outcome.cells)
            if outcome.overlay is not None:
                imsave(output_dir / overlay_name(path.name), outcome.overlay, check_contrast=False)
            counts_writer.writerow(outcome.row)
            # Flushed per image so an interrupted job keeps every finished row.
            counts_file.flush()
            cells_file.flush()

    summary = CountSummary(
        images=len(paths),
        counted=counted,
        failed=failed,
        cells=total_cells,
        seconds=time.monotonic() - started,
        output_dir=output_dir,
    )
    logger.info(
        "Counted %d of %d images (%d failed, %d cells) in %.1f s; results in %s",
        counted, len(paths), failed, total_cells, summary.seconds, output_dir,
    )
    return summary


def _round(value):
    return round(value, 4) if isinstance(value, float) else value
