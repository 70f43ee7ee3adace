"""Count the cells of every image in a folder into CSV files and overlay PNGs.

Outputs, written as each image finishes so that an interrupted job keeps its rows:

- ``counts.csv``: one row per image (file, count, mean foreground probability, width,
  height, status, error);
- ``cells.csv``: one row per cell (file, cell id, centroid x and y, area and equivalent
  diameter in original pixels, mean probability);
- ``overlays/<image stem>.png``: cell outlines and the Grad-CAM heatmap over the image.

A file that cannot be read or counted gets a row with status ``error`` and the reason;
the other images are still counted.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from skimage.io import imsave
from tqdm import tqdm

from ccflow.counter import CellCounter
from ccflow.data import IMAGE_SUFFIXES, read_image
from ccflow.errors import CcflowError, DatasetError
from ccflow.postprocess import MEASURE_COLUMNS

logger = logging.getLogger(__name__)

COUNTS_COLUMNS = ["file", "count", "mean_probability", "width", "height", "status", "error"]
CELLS_COLUMNS = ["file", *MEASURE_COLUMNS]


@dataclass
class CountSummary:
    """Totals of one counting job."""

    images: int
    counted: int
    failed: int
    cells: int
    seconds: float
    output_dir: Path


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
    """Count every image of ``input_dir`` and write the results to ``output_dir``.

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
    overlay_dir = output_dir / "overlays"
    overlay_dir.mkdir(parents=True, exist_ok=True)

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
            row = {"file": path.name, "status": "ok", "error": ""}
            try:
                image = read_image(path)
                result = counter.count(image, explain=overlays)
            except (CcflowError, OSError, ValueError, RuntimeError) as error:
                failed += 1
                row.update(status="error", error=f"{type(error).__name__}: {error}")
                logger.error("Could not count %s: %s", path, error)
            else:
                counted += 1
                total_cells += result.count
                height, width = result.labels.shape
                row.update(
                    count=result.count,
                    mean_probability=_round(result.mean_probability),
                    width=width,
                    height=height,
                )
                for cell in result.cells.to_dict(orient="records"):
                    cells_writer.writerow({"file": path.name, **{k: _round(v) for k, v in cell.items()}})
                if result.overlay is not None:
                    imsave(overlay_dir / f"{path.stem}.png", result.overlay, check_contrast=False)
                logger.info("%s: %d cells", path.name, result.count)
            counts_writer.writerow(row)
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
