"""Check images and training pairs against the Great Expectations suites in ``validation/``.

Each image becomes one metadata row (:func:`image_metadata`, :func:`pair_metadata`), and one
Great Expectations (GX Core 1.x) run checks a whole table of rows against a suite. Every
threshold lives in the suite files; this module only measures.

Suites, by the name :class:`ImageValidator` takes:

- ``"counting"``: ``validation/counting_images.json``, for images to count;
- ``"training"``: the counting suite plus ``validation/training_pairs.json``, for image and
  mask pairs to train on.

Typical use in a batch job::

    validator = ImageValidator("counting")
    rows, images = zip(*(image_metadata(name, data) for name, data in files))
    failures = validator.failures(pandas.DataFrame(rows))
    # failures[i] is [] for a valid image, else the failed expectations of image i.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import pandas as pd
from scipy import ndimage

from ccflow.data import Sample, decode_image, list_samples
from ccflow.errors import CcflowError, DatasetError, ImageReadError

logger = logging.getLogger(__name__)

SuiteName = Literal["counting", "training"]

SUITE_FILES: dict[str, tuple[str, ...]] = {
    "counting": ("counting_images.json",),
    "training": ("counting_images.json", "training_pairs.json"),
}

SUITE_DIR_VARIABLE = "CCFLOW_SUITE_DIR"
"""Environment variable that overrides the folder holding the suite files."""

# NOTE: the default assumes a source checkout (ccflow installed editable), because
# validation/ sits next to the package and is not packaged into a wheel.
DEFAULT_SUITE_DIR = Path(__file__).resolve().parents[1] / "validation"

IMAGE_COLUMNS = [
    "file",
    "readable",
    "error",
    "format",
    "width",
    "height",
    "channels",
    "bit_depth",
    "min_intensity",
    "max_intensity",
    "saturated_fraction",
    "dynamic_range",
    "focus",
]
MASK_COLUMNS = [
    "mask_file",
    "mask_readable",
    "mask_error",
    "mask_width",
    "mask_height",
    "mask_channels_equal",
    "mask_levels",
    "mask_foreground_fraction",
    "cells",
]

_ROW_ID = "_row"
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Samples per pixel of each PNG colour type (grey, RGB, palette, grey + alpha, RGBA).
_PNG_CHANNELS = {0: 1, 2: 3, 3: 3, 4: 2, 6: 4}


class SuiteError(CcflowError):
    """A suite file is missing or invalid, or an expectation could not be evaluated."""


# --------------------------------------------------------------------------------------
# Metadata rows
# --------------------------------------------------------------------------------------


def image_metadata(
    name: str, data: bytes, image: np.ndarray | None = None
) -> tuple[dict[str, Any], np.ndarray | None]:
    """Measure one image file into a metadata row for the suites.

    Parameters
    ----------
    name : str
        File name or path, stored in the ``file`` column and used in messages.
    data : bytes
        Content of the file.
    image : numpy.ndarray, optional
        ``data`` already decoded by :func:`ccflow.data.decode_image`, so that a caller
        that decoded the file itself does not pay for a second decoding.

    Returns
    -------
    row : dict
        Keys :data:`IMAGE_COLUMNS`. ``readable`` is False and ``error`` contains the reason
        when the file does not decode; the measurements are then None. ``format``,
        ``channels`` and ``bit_depth`` describe the file as stored (from the PNG or TIFF
        header), before ccflow converts it to RGB. Intensities are fractions of the full
        scale of the stored dtype (255 or 65535): ``min_intensity`` and ``max_intensity``
        over all channels, ``saturated_fraction`` the share of pixels with any channel at
        full scale, ``dynamic_range`` the 0.5 to 99.5 percentile range of the grey image
        (channel mean), and ``focus`` the variance of its Laplacian.
    image : numpy.ndarray or None
        The decoded raw image (H, W, 3), uint8 or uint16, as :func:`ccflow.data.decode_image`
        returns it, so that callers need not decode twice; None when unreadable.
    """
    row: dict[str, Any] = dict.fromkeys(IMAGE_COLUMNS)
    row.update(file=name, readable=False, error="", format=_file_format(data))
    header = _header_info(data)
    if image is None:
        try:
            image = decode_image(data, name)
        except ImageReadError as error:
            row["error"] = str(error)
            return row, None

    full_scale = float(np.iinfo(image.dtype).max)
    grey = image.mean(axis=2, dtype=np.float32) / np.float32(full_scale)
    low, high = np.percentile(grey, [0.5, 99.5])
    row.update(
        readable=True,
        width=int(image.shape[1]),
        height=int(image.shape[0]),
        channels=header.get("channels", 3),
        bit_depth=header.get("bit_depth", image.dtype.itemsize * 8),
        min_intensity=float(image.min()) / full_scale,
        max_intensity=float(image.max()) / full_scale,
        saturated_fraction=float((image == image.dtype.type(full_scale)).any(axis=2).mean()),
        dynamic_range=float(high - low),
        focus=float(cv2.Laplacian(grey, cv2.CV_32F).var()),
    )
    return row, image


def mask_metadata(name: str, data: bytes) -> dict[str, Any]:
    """Measure one mask file into the mask columns of a metadata row.

    Parameters
    ----------
    name : str
        File name or path of the mask.
    data : bytes
        Content of the mask file.

    Returns
    -------
    dict
        Keys :data:`MASK_COLUMNS`. ``mask_levels`` is the number of distinct pixel values
        (a binary mask has 1 or 2), ``mask_foreground_fraction`` the share of non-zero
        pixels, and ``cells`` the number of 8-connected components of non-zero pixels.
        The measurements are None when the file does not decode.
    """
    row: dict[str, Any] = dict.fromkeys(MASK_COLUMNS)
    row.update(mask_file=name, mask_readable=False, mask_error="")
    try:
        raw = decode_image(data, name)
    except ImageReadError as error:
        row["mask_error"] = str(error)
        return row

    plane = raw[:, :, 0]
    channels_equal = bool(np.array_equal(plane, raw[:, :, 1]) and np.array_equal(plane, raw[:, :, 2]))
    levels = np.unique(plane if channels_equal else raw)
    foreground = (raw > 0).any(axis=2)
    _, n_cells = ndimage.label(foreground, structure=_EIGHT_CONNECTED)
    row.update(
        mask_readable=True,
        mask_width=int(raw.shape[1]),
        mask_height=int(raw.shape[0]),
        mask_channels_equal=channels_equal,
        mask_levels=int(levels.size),
        mask_foreground_fraction=float(foreground.mean()),
        cells=int(n_cells),
    )
    return row


def pair_metadata(sample: Sample) -> dict[str, Any]:
    """Measure a training sample's image and mask files into one metadata row.

    Parameters
    ----------
    sample : ccflow.data.Sample
        Sample with ``mask_path`` set.

    Returns
    -------
    dict
        Keys :data:`IMAGE_COLUMNS` and :data:`MASK_COLUMNS`; ``file`` and ``mask_file``
        are the paths. A file that cannot be read counts as unreadable.
    """
    if sample.mask_path is None:
        raise DatasetError(f"{sample.image_path}: no mask for this image. Add a mask with the same stem to masks/.")
    row, _ = image_metadata(str(sample.image_path), _read_bytes(sample.image_path))
    row.update(mask_metadata(str(sample.mask_path), _read_bytes(sample.mask_path)))
    return row


def _read_bytes(path: Path) -> bytes:
    # An unreadable file becomes an empty one, which decode_image reports as unreadable,
    # so one bad file does not stop the measurement of the others.
    try:
        return Path(path).read_bytes()
    except OSError as error:
        logger.error("%s: the file cannot be read (%s)", path, error)
        return b""


def _file_format(data: bytes) -> str:
    if data.startswith(_PNG_SIGNATURE):
        return "png"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return "unknown"


def _header_info(data: bytes) -> dict[str, int]:
    """Read the stored channel count and bit depth from a PNG or TIFF header, if present."""
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 26 and data[12:16] == b"IHDR":
        bit_depth, colour_type = struct.unpack(">BB", data[24:26])
        if colour_type in _PNG_CHANNELS:
            return {"channels": _PNG_CHANNELS[colour_type], "bit_depth": int(bit_depth)}
        return {}
    if _file_format(data) == "tiff":
        import io

        import tifffile

        # Any damage surfaces later as an unreadable file, so a header that fails to
        # parse here only leaves the decoded values in place.
        try:
            with tifffile.TiffFile(io.BytesIO(data)) as tiff:
                page = tiff.pages.first
                bits = page.bitspersample
                return {"channels": int(page.samplesperpixel), "bit_depth": int(bits)}
        except Exception:  # noqa: BLE001
            return {}
    return {}


# --------------------------------------------------------------------------------------
# Suites and Great Expectations runs
# --------------------------------------------------------------------------------------


def suite_dir() -> Path:
    """Return the folder of the suite files: ``$CCFLOW_SUITE_DIR`` or ``validation/`` of the checkout."""
    return Path(os.environ.get(SUITE_DIR_VARIABLE) or DEFAULT_SUITE_DIR)


def load_suite_dict(suite: SuiteName, directory: Path | None = None) -> dict[str, Any]:
    """Read the suite files of ``suite`` and merge them into one GX suite dictionary.

    Raises
    ------
    SuiteError
        If ``suite`` is unknown or a file is missing or not valid JSON.
    """
    if suite not in SUITE_FILES:
        raise SuiteError(f"Unknown suite {suite!r}: choose one of {', '.join(SUITE_FILES)}.")
    directory = Path(directory) if directory else suite_dir()
    expectations: list[dict[str, Any]] = []
    for file_name in SUITE_FILES[suite]:
        path = directory / file_name
        try:
            content = json.loads(path.read_text())
        except FileNotFoundError as error:
            raise SuiteError(
                f"{path}: suite file not found. Run from a ccflow checkout or set "
                f"{SUITE_DIR_VARIABLE} to the folder holding the suite files."
            ) from error
        except json.JSONDecodeError as error:
            raise SuiteError(f"{path}: invalid JSON ({error}). Fix the suite file.") from error
        expectations.extend(content.get("expectations", []))
    return {"name": suite, "expectations": expectations, "meta": {"files": list(SUITE_FILES[suite])}}


def _import_gx():
    # GX Core can send usage statistics; ccflow must not contact outside hosts.
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    return gx, ProgressBarsConfig


@dataclass
class ValidationOutcome:
    """Result of checking a table of metadata rows against a suite.

    Attributes
    ----------
    failures : list of list of str
        Per row, in row order, the failed expectations as text; empty for a valid row.
    success : bool
        True when every row passed every expectation.
    statistics : dict
        Counts per expectation: ``{description: number of rows that failed it}``.
    """

    failures: list[list[str]]
    success: bool
    statistics: dict[str, int] = field(default_factory=dict)


class ImageValidator:
    """Run a suite from ``validation/`` on tables of image metadata rows with GX Core.

    Parameters
    ----------
    suite : {"counting", "training"}
        ``"counting"`` checks images, ``"training"`` checks image and mask pairs (the
        counting suite plus the training-pair suite).
    directory : pathlib.Path, optional
        Folder of the suite files; defaults to :func:`suite_dir`.
    project_dir : pathlib.Path, optional
        Folder for a file-backed GX project that keeps validation results and can build
        data docs (:meth:`build_data_docs`). Without it, an ephemeral in-memory context is
        used, which suits batch jobs.

    Notes
    -----
    The GX context is created on first use, and pickling drops it, so an instance can be
    shipped to Ray actors. Validate many rows per call: each GX run has a fixed overhead
    of tens of milliseconds.
    """

    def __init__(
        self,
        suite: SuiteName = "counting",
        *,
        directory: Path | None = None,
        project_dir: Path | None = None,
    ) -> None:
        self.suite = suite
        self.suite_dict = load_suite_dict(suite, directory)
        self.project_dir = Path(project_dir) if project_dir else None
        self._context = None
        self._runner = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_context"] = None
        state["_runner"] = None
        return state

    def prepare(self) -> None:
        """Import GX and build its context now, rather than on the first validation.

        The import takes seconds, so a Ray actor calls this at start-up to keep that time
        out of its per-batch timings.
        """
        if self._runner is None:
            self._runner = self._build_runner()

    def failures(self, rows: pd.DataFrame) -> list[list[str]]:
        """Return, per row in row order, the descriptions of the expectations it failed.

        Parameters
        ----------
        rows : pandas.DataFrame
            One row per image, with the columns :func:`image_metadata` returns (and
            :func:`mask_metadata`'s for the training suite). Extra columns are ignored.

        Returns
        -------
        list of list of str
            ``[]`` for a valid row, otherwise texts such as
            ``"the image is in focus: ... (focus=1.2e-07)"``.
        """
        return self.validate(rows).failures

    def validate(self, rows: pd.DataFrame) -> ValidationOutcome:
        """Check the rows in one GX run and map each failure back to its row.

        Raises
        ------
        SuiteError
            If an expectation cannot be evaluated, for example because the rows lack a
            column it names.
        """
        if len(rows) == 0:
            return ValidationOutcome(failures=[], success=True)
        table = rows.reset_index(drop=True).copy()
        table[_ROW_ID] = np.arange(len(table))
        result = self._run(table)

        failures: list[list[str]] = [[] for _ in range(len(table))]
        statistics: dict[str, int] = {}
        for expectation_result in result.results:
            config = expectation_result.expectation_config
            description = config.description or f"{config.type} {dict(config.kwargs)}"
            info = expectation_result.exception_info or {}
            if info.get("raised_exception"):
                raise SuiteError(
                    f"Suite {self.suite!r}: the expectation '{description}' could not be "
                    f"evaluated: {info.get('exception_message')}. Check the column names "
                    f"in the suite file against the metadata columns."
                )
            if expectation_result.success:
                continue
            unexpected = expectation_result.result.get("unexpected_index_list")
            if unexpected is None:
                # A table-level expectation has no rows to blame, so it fails them all.
                unexpected = [{_ROW_ID: index} for index in range(len(table))]
            statistics[description] = len(unexpected)
            for entry in unexpected:
                values = ", ".join(f"{k}={_format_value(v)}" for k, v in entry.items() if k != _ROW_ID)
                failures[int(entry[_ROW_ID])].append(f"{description} ({values})" if values else description)
        return ValidationOutcome(failures=failures, success=not statistics, statistics=statistics)

    def build_data_docs(self) -> Path:
        """Build the GX data docs of the runs so far and return the folder with ``index.html``.

        Raises
        ------
        SuiteError
            If the validator has no ``project_dir`` or nothing was validated yet.
        """
        if self.project_dir is None or self._context is None:
            raise SuiteError(
                "Data docs need a file-backed GX project: create the ImageValidator with "
                "project_dir=... and validate rows first."
            )
        self._context.build_data_docs()
        site = self.project_dir / "gx" / "uncommitted" / "data_docs" / "local_site"
        if not (site / "index.html").is_file():
            raise SuiteError(f"{site}: GX wrote no index.html; check the GX log above.")
        return site

    def _run(self, table: pd.DataFrame):
        if self._runner is None:
            self._runner = self._build_runner()
        result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": [_ROW_ID]}
        return self._runner.run(batch_parameters={"dataframe": table}, result_format=result_format)

    def _build_runner(self):
        gx, progress_bars_config = _import_gx()
        if self.project_dir is None:
            context = gx.get_context(mode="ephemeral")
        else:
            self.project_dir.mkdir(parents=True, exist_ok=True)
            context = gx.get_context(mode="file", project_root_dir=str(self.project_dir))
        context.variables.progress_bars = progress_bars_config(globally=False)

        try:
            suite = context.suites.add(gx.ExpectationSuite(**self.suite_dict))
        except Exception as error:  # GX raises several types for a malformed expectation.
            raise SuiteError(
                f"Suite {self.suite!r} from {', '.join(SUITE_FILES[self.suite])} is invalid: {error}"
            ) from error
        batch = (
            context.data_sources.add_pandas(f"ccflow-{self.suite}")
            .add_dataframe_asset("image_metadata")
            .add_batch_definition_whole_dataframe("all_rows")
        )
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"ccflow-{self.suite}", data=batch, suite=suite)
        )
        self._context = context
        return definition


def _format_value(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.3g}"
    if isinstance(value, np.generic):
        return str(value.item())
    return str(value)


# --------------------------------------------------------------------------------------
# Training ingestion
# --------------------------------------------------------------------------------------


def check_training_samples(samples: list[Sample], *, directory: Path | None = None) -> pd.DataFrame:
    """Check every image and mask pair of a training set; raise when any pair fails.

    Parameters
    ----------
    samples : list of ccflow.data.Sample
        Samples with masks, as :func:`ccflow.data.list_samples` returns them.
    directory : pathlib.Path, optional
        Folder of the suite files.

    Returns
    -------
    pandas.DataFrame
        The metadata rows with a ``failures`` column, when every pair is valid.

    Raises
    ------
    DatasetError
        If any pair fails the ``"training"`` suite. The message lists every invalid file
        with the expectations it failed.
    """
    rows = pd.DataFrame([pair_metadata(sample) for sample in samples])
    failures = ImageValidator("training", directory=directory).failures(rows)
    rows["failures"] = ["; ".join(items) for items in failures]

    bad = [(sample, items) for sample, items in zip(samples, failures, strict=True) if items]
    if bad:
        listed = "\n".join(
            f"  {sample.image_path} (mask {sample.mask_path}): {'; '.join(items)}" for sample, items in bad
        )
        raise DatasetError(
            f"{len(bad)} of {len(samples)} training pairs failed validation:\n{listed}\n"
            f"Fix or remove these files; the thresholds are in the suite files in {directory or suite_dir()}."
        )
    logger.info("All %d training pairs passed the training suite", len(samples))
    return rows


# --------------------------------------------------------------------------------------
# Folder reports (`ccflow validate`)
# --------------------------------------------------------------------------------------


@dataclass
class FolderValidation:
    """Summary of ``ccflow validate`` on one folder."""

    path: Path
    suite: str
    images: int
    invalid: int
    failed_expectations: dict[str, int]
    report_csv: Path
    summary_json: Path
    data_docs: Path
    mlflow_run_id: str | None

    def to_dict(self) -> dict[str, Any]:
        """Return the summary as JSON-ready values."""
        return {
            "path": str(self.path),
            "suite": self.suite,
            "images": self.images,
            "invalid": self.invalid,
            "failed_expectations": self.failed_expectations,
            "report_csv": str(self.report_csv),
            "data_docs": str(self.data_docs / "index.html"),
            "mlflow_run_id": self.mlflow_run_id,
        }


VALIDATION_EXPERIMENT = "ccflow-validation"


def validate_folder(
    path: Path,
    output_dir: Path,
    *,
    log_to_mlflow: bool = True,
    experiment: str = VALIDATION_EXPERIMENT,
) -> FolderValidation:
    """Check every image (and mask) of a folder, write a report and the GX data docs.

    A folder with ``images/`` and ``masks/`` is checked with the ``"training"`` suite,
    any other folder of images with the ``"counting"`` suite.

    Parameters
    ----------
    path : pathlib.Path
        Folder of images, or dataset folder with ``images/`` and ``masks/``.
    output_dir : pathlib.Path
        Receives ``validation.csv`` (one row per image: metadata, ``status`` valid or
        invalid, ``failures``), ``summary.json`` and ``data_docs/`` (open
        ``data_docs/index.html``).
    log_to_mlflow : bool
        Log the report, the summary and the data docs as artifacts, plus the metrics
        ``images_checked`` and ``images_invalid``, to the active MLflow run, or to a new
        run in ``experiment`` when none is active.

    Raises
    ------
    DatasetError
        If the folder is missing or contains no images.
    """
    path = Path(path)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    labelled = (path / "images").is_dir() and (path / "masks").is_dir()
    suite: SuiteName = "training" if labelled else "counting"
    samples = list_samples(path, require_masks=labelled)

    if labelled:
        rows = pd.DataFrame([pair_metadata(sample) for sample in samples])
    else:
        rows = pd.DataFrame([image_metadata(str(s.image_path), _read_bytes(s.image_path))[0] for s in samples])

    with tempfile.TemporaryDirectory(prefix="ccflow-gx-") as project:
        validator = ImageValidator(suite, project_dir=Path(project))
        outcome = validator.validate(rows)
        docs = output_dir / "data_docs"
        shutil.rmtree(docs, ignore_errors=True)
        shutil.copytree(validator.build_data_docs(), docs)

    rows["status"] = ["invalid" if items else "valid" for items in outcome.failures]
    rows["failures"] = ["; ".join(items) for items in outcome.failures]
    report_csv = output_dir / "validation.csv"
    rows.to_csv(report_csv, index=False)
    invalid = int((rows["status"] == "invalid").sum())
    summary = FolderValidation(
        path=path,
        suite=suite,
        images=len(rows),
        invalid=invalid,
        failed_expectations=outcome.statistics,
        report_csv=report_csv,
        summary_json=output_dir / "summary.json",
        data_docs=docs,
        mlflow_run_id=None,
    )
    if log_to_mlflow:
        summary.mlflow_run_id = _log_report(summary, experiment)
    summary.summary_json.write_text(json.dumps(summary.to_dict(), indent=2) + "\n")
    if summary.mlflow_run_id:
        import mlflow

        mlflow.MlflowClient().log_artifact(summary.mlflow_run_id, str(summary.summary_json), "validation")
    logger.info("%d of %d images invalid in %s; report in %s", invalid, len(rows), path, output_dir)
    return summary


def _log_report(summary: FolderValidation, experiment: str) -> str:
    import mlflow

    active = mlflow.active_run()
    if active is None:
        mlflow.set_experiment(experiment)
    with mlflow.start_run() if active is None else contextlib.nullcontext(active) as run:
        mlflow.log_params({"validation_path": str(summary.path.resolve()), "validation_suite": summary.suite})
        mlflow.log_metrics({"images_checked": summary.images, "images_invalid": summary.invalid})
        mlflow.log_artifact(str(summary.report_csv), artifact_path="validation")
        mlflow.log_artifacts(str(summary.data_docs), artifact_path="validation/data_docs")
        logger.info("Logged the validation report to MLflow run %s", run.info.run_id)
        return run.info.run_id
