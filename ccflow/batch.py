"""Count every image under a local folder, gs:// or s3:// prefix with a Ray Data job.

The job behind ``ccflow count`` and ``jobs/nightly_count.py``:

1. lists the PNG and TIFF objects under INPUT on the driver (names, sizes, fingerprints)
   and leaves out those that the ledger records with the same fingerprint;
2. reads the bytes of each image in Ray tasks;
3. decodes the images in a pool of actors that each load the model once. Each actor
   checks a batch against the ``counting`` suite in one Great Expectations run, counts
   and post-processes the valid images, adds them to its drift histograms, and writes
   the overlays to ``OUTPUT/overlays/``;
4. streams the result rows back to the driver, which appends them to one ``counts.csv``
   and one ``cells.csv``, records each finished image in ``ledger.csv`` and merges the
   drift histograms that come with each batch;
5. scores the drift of the counted images against the reference profile of the model,
   writes a run manifest to ``OUTPUT/runs/`` and logs the same figures to an MLflow run.

Incremental and resumable: ``ledger.csv`` lists every finished image (name, fingerprint,
SHA-256 of the content, status). A later run over the same INPUT and OUTPUT counts only
images that are new or whose fingerprint changed. Rows reach the CSV files before their
image reaches the ledger. At start-up the job drops every CSV row whose image the ledger
does not list as finished. So a run killed midway and started again ends with each image
exactly once. For bucket outputs the three files are kept in a local working
folder and uploaded every ``upload_interval_s`` seconds and at the end, the ledger last.

Invalid images are finished images too: the ledger lists them with status ``invalid``,
so an unchanged invalid file is not checked again every night. A new version of the file
is checked again. After editing the suite, run once with ``recount`` to check every
image again.

NOTE: the drift of a run that was killed and started again covers only the images that
the second start counted.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd

from ccflow.count import CELLS_COLUMNS, COUNTS_COLUMNS, ImageOutcome, count_images, overlay_name
from ccflow.data import IMAGE_SUFFIXES
from ccflow.drift import DEFAULT_THRESHOLD, DriftAccumulator, DriftReport
from ccflow.energy import DEFAULT_COUNTRY
from ccflow.errors import CcflowError
from ccflow.storage import (
    Location,
    ObjectReadError,
    Storage,
    StorageError,
    StorageOptions,
    open_storage,
)
from ccflow.validation import ImageValidator, SuiteError

logger = logging.getLogger(__name__)

COUNTS_FILE = "counts.csv"
CELLS_FILE = "cells.csv"
LEDGER_FILE = "ledger.csv"
LEDGER_COLUMNS = ["file", "fingerprint", "sha256", "status", "finished_at"]
STAGES = ("read", "decode", "validate", "count", "drift", "overlay")

# Reading is network or disk bound. Read tasks reserve no CPU, because actors that hold
# every CPU of the cluster would otherwise keep them from being scheduled.
READ_TASK_CPUS = 0
# Tasks that reserve no CPU are otherwise not limited at all: Ray would start a worker
# process (about 0.4 GB with ccflow imported) for every block at once and run out of
# memory on large buckets. Two concurrent reads per counting actor keep the actors fed.
READ_TASKS_PER_ACTOR = 2
# Upper bound on the blocks of the listed-image dataset, to bound Ray's per-block overhead.
MAX_BLOCKS = 2000


@dataclass
class CountJobConfig:
    """Settings of one counting job.

    Attributes
    ----------
    input : str
        Local folder, ``gs://bucket/prefix`` or ``s3://bucket/prefix`` of PNG or TIFF
        images, searched recursively. A local folder with an ``images/`` subfolder is
        read from there.
    output : str
        Local folder or bucket prefix for the CSV files, overlays, ledger and manifests.
    model_uri : str
        MLflow model URI of a ccflow cell counter.
    overlays : bool
        Write an overlay PNG per counted image.
    concurrency : int or None
        Actors that count images. None: one per GPU share with ``num_gpus``, else one
        per ``cpus_per_actor`` CPUs of the Ray cluster.
    num_gpus : float
        GPUs per actor; 0 counts on CPUs.
    cpus_per_actor : float
        CPUs reserved per actor; also its number of PyTorch threads (at least 1).
    batch_size : int
        Images per batch handed to an actor.
    recount : bool
        Ignore the ledger and previous results: count every image again.
    s3_endpoint_url : str or None
        Endpoint of an S3-compatible store; None uses ``AWS_ENDPOINT_URL`` or AWS.
    experiment : str or None
        MLflow experiment of the job's run; None logs no run.
    energy : bool
        Measure energy and CO2 with CodeCarbon on the driver.
    country_iso_code : str
        Electricity grid for the CO2 estimate (ISO 3166-1 alpha-3).
    upload_interval_s : float
        Seconds between uploads of the CSV files and the ledger to a bucket output.
    validate : bool
        Check every image against the ``counting`` suite and leave invalid ones uncounted.
    drift_threshold : float
        The run is tagged ``drift_flagged=true`` when its overall drift (largest
        per-feature PSI) exceeds this value; raise it to flag fewer runs.
    """

    input: str
    output: str
    model_uri: str
    overlays: bool = True
    concurrency: int | None = None
    num_gpus: float = 0.0
    cpus_per_actor: float = 1.0
    batch_size: int = 4
    recount: bool = False
    s3_endpoint_url: str | None = None
    experiment: str | None = "ccflow-counting"
    energy: bool = True
    country_iso_code: str = DEFAULT_COUNTRY
    upload_interval_s: float = 60.0
    validate: bool = True
    drift_threshold: float = DEFAULT_THRESHOLD


@dataclass
class JobTotals:
    """Images and cells of one run by outcome, and seconds spent per stage."""

    listed: int = 0
    skipped: int = 0
    counted: int = 0
    failed: int = 0
    invalid: int = 0
    cells: int = 0
    stage_seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))

    @property
    def finished(self) -> int:
        return self.counted + self.failed + self.invalid


# --------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------


def run_count_job(config: CountJobConfig, counter=None) -> dict[str, Any]:
    """Count the new and changed images under ``config.input`` into ``config.output``.

    Parameters
    ----------
    config : CountJobConfig
        Locations, model and Ray settings.
    counter : CellCounter, optional
        Counter to use instead of loading ``config.model_uri`` (benchmarks pass an
        untrained one); the URI is then only recorded.

    Returns
    -------
    dict
        The run manifest, also written to ``OUTPUT/runs/<start time>.json``.

    Raises
    ------
    StorageError
        A bucket is missing, credentials are missing or rejected, a permission is
        lacking, or a storage call still failed after its retries.
    mlflow.exceptions.MlflowException
        The model cannot be loaded.
    ccflow.validation.SuiteError
        The suite files of the ``counting`` suite are missing or cannot be evaluated.

    Notes
    -----
    A model whose training run logged no drift reference profile is counted as usual:
    the job logs a warning, and the manifest and the MLflow run carry no drift score.
    """
    _check_config(config)
    started_at = datetime.now(timezone.utc)
    options = StorageOptions.from_environment(config.s3_endpoint_url)
    input_location = _input_location(Location.parse(config.input))
    output_location = Location.parse(config.output)

    # Fail before any work when a location cannot be used.
    input_storage = open_storage(input_location, options)
    input_storage.check()
    output_storage = open_storage(output_location, options)
    output_storage.check(write=True)

    model = _describe_model(config.model_uri)
    if counter is None:
        from ccflow.registry import load_counter

        counter = load_counter(config.model_uri)
    validator = None
    if config.validate:
        # Created here so that missing suite files stop the job before any work. Ray
        # pickles it into each actor without its GX context, which each actor rebuilds.
        validator = ImageValidator("counting")

    work_dir, temporary = _working_folder(output_location)
    try:
        outputs = _OutputFiles(work_dir, output_storage, config.upload_interval_s)
        outputs.fetch()
        totals, todo = _plan(input_storage, outputs, output_location, input_location, config.recount)
        reference, drift_reason = _drift_reference(config.model_uri) if todo else (None, "no images to count")
        drift = DriftAccumulator() if reference is not None else None
        run_name = started_at.strftime("%Y%m%dT%H%M%SZ")
        with _energy_tracking(config, work_dir / "runs") as tracking:
            started = time.monotonic()
            if todo:
                _count(todo, config, options, counter, validator, drift, input_location, output_location, outputs, totals)
            else:
                logger.info("No new or changed images under %s; nothing to count", input_location)
            seconds = time.monotonic() - started
        outputs.sync(force=True)

        drift_report, drift_reason = _score_drift(drift, reference, config.drift_threshold, drift_reason)
        energy = tracking.report if tracking is not None else None
        manifest = _manifest(config, model, input_location, output_location, started_at, seconds, totals, energy)
        manifest["drift"] = _drift_manifest(drift_report, drift_reason, config.drift_threshold)
        manifest["mlflow_run_id"] = _log_mlflow_run(config, manifest, energy, run_name, drift_report)
        _write_manifest(manifest, work_dir, output_storage, run_name, energy)
    finally:
        if temporary:
            shutil.rmtree(work_dir, ignore_errors=True)
    logger.info(
        "Counted %d images (%d failed, %d invalid, %d skipped as already counted, %d cells) "
        "in %.1f s, %.2f images/s; results in %s",
        totals.counted, totals.failed, totals.invalid, totals.skipped, totals.cells,
        seconds, manifest["images_per_s"], output_location,
    )
    return manifest


def _check_config(config: CountJobConfig) -> None:
    if config.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {config.batch_size}.")
    if config.concurrency is not None and config.concurrency < 1:
        raise ValueError(f"concurrency must be at least 1 or None, got {config.concurrency}.")
    if config.num_gpus < 0 or config.cpus_per_actor <= 0:
        raise ValueError(
            f"num_gpus must be >= 0 and cpus_per_actor > 0, got {config.num_gpus} and {config.cpus_per_actor}."
        )
    if not config.drift_threshold > 0:
        raise ValueError(f"drift_threshold must be greater than 0, got {config.drift_threshold}.")


def _input_location(location: Location) -> Location:
    # Same convention as ccflow.count.list_images: a dataset folder is read from images/.
    if location.scheme == "file" and (Path(location.prefix) / "images").is_dir():
        return Location("file", "", str(Path(location.prefix) / "images"))
    return location


def _working_folder(output: Location) -> tuple[Path, bool]:
    if output.scheme == "file":
        return Path(output.prefix), False
    return Path(tempfile.mkdtemp(prefix="ccflow-count-")), True


def _plan(
    input_storage: Storage,
    outputs: "_OutputFiles",
    output_location: Location,
    input_location: Location,
    recount: bool,
) -> tuple[JobTotals, list[dict]]:
    """List the input, pick the images to count and drop rows that will be redone."""
    finished = {} if recount else outputs.read_ledger()
    excluded = _excluded_prefix(input_location, output_location)
    totals = JobTotals()
    todo: list[dict] = []
    # NOTE: the ledger and the to-do list are held in memory, about 200 bytes per image;
    # image bytes and results never are.
    for info in input_storage.list(IMAGE_SUFFIXES):
        if excluded and info.name.startswith(excluded):
            continue
        totals.listed += 1
        if finished.get(info.name) == info.fingerprint:
            totals.skipped += 1
        else:
            todo.append({"file": info.name, "fingerprint": info.fingerprint, "size": info.size})
        if totals.listed % 10000 == 0:
            logger.info("Listed %d images under %s", totals.listed, input_location)

    if totals.listed == 0:
        logger.warning("No PNG or TIFF images found under %s", input_location)
    logger.info(
        "%d images under %s: %d to count, %d already counted",
        totals.listed, input_location, len(todo), totals.skipped,
    )
    redo = {item["file"] for item in todo}
    outputs.compact(keep={name for name in finished if name not in redo}, reset=recount)
    return totals, todo


def _excluded_prefix(input_location: Location, output_location: Location) -> str | None:
    # An output folder inside the input folder must not have its overlays counted.
    if input_location.scheme != output_location.scheme or input_location.bucket != output_location.bucket:
        return None
    inner, outer = output_location.prefix, input_location.prefix
    if input_location.scheme == "file":
        try:
            relative = Path(inner).relative_to(outer).as_posix()
        except ValueError:
            return None
        return "" if relative == "." else f"{relative}/"
    if not outer:
        return f"{inner}/" if inner else ""
    return f"{inner[len(outer) + 1:]}/" if inner.startswith(f"{outer}/") else None


def _count(
    todo: list[dict],
    config: CountJobConfig,
    options: StorageOptions,
    counter,
    validator: ImageValidator | None,
    drift: DriftAccumulator | None,
    input_location: Location,
    output_location: Location,
    outputs: "_OutputFiles",
    totals: JobTotals,
) -> None:
    """Run the Ray Data pipeline over ``todo``, append its rows to the outputs and merge
    the drift histograms of its batches into ``drift``."""
    import ray

    if not ray.is_initialized():
        ray.init()
    concurrency = config.concurrency or _default_concurrency(config)
    logger.info(
        "Counting %d images with %d actors (%.2g GPUs, %.2g CPUs each), batches of %d",
        len(todo), concurrency, config.num_gpus, config.cpus_per_actor, config.batch_size,
    )
    dataset = build_dataset(
        todo,
        counter_ref=ray.put(counter),
        input_location=input_location,
        output_location=output_location,
        options=options,
        overlays=config.overlays,
        batch_size=config.batch_size,
        concurrency=concurrency,
        num_gpus=config.num_gpus,
        cpus_per_actor=config.cpus_per_actor,
        validator=validator,
        collect_drift=drift is not None,
    )
    try:
        for batch in dataset.iter_batches(batch_size=None, batch_format="pandas"):
            outputs.append(batch, totals)
            outputs.sync()
            if drift is not None:
                _merge_drift(drift, batch)
    except Exception as error:
        cause = _job_error_cause(error)
        if cause is not None:
            raise cause from error
        raise
    finally:
        outputs.close()
        _save_progress(outputs)


def _save_progress(outputs: "_OutputFiles") -> None:
    # Uploads what finished before a failure, so that a restart does not redo it.
    try:
        outputs.sync(force=True)
    except StorageError as error:
        logger.error("Could not upload the results so far: %s", error)


def _default_concurrency(config: CountJobConfig) -> int:
    import ray

    resources = ray.cluster_resources()
    if config.num_gpus > 0:
        return max(1, int(resources.get("GPU", 0) // config.num_gpus))
    return max(1, int(resources.get("CPU", 1) // config.cpus_per_actor))


def _job_error_cause(error: BaseException) -> CcflowError | None:
    # Ray wraps exceptions raised in tasks; the storage or suite error inside has the
    # message to show, and the command line turns it into exit code 2.
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, (StorageError, SuiteError)):
            return error
        error = getattr(error, "cause", None) or error.__cause__
    return None


# --------------------------------------------------------------------------------------
# The Ray Data pipeline
# --------------------------------------------------------------------------------------


def build_dataset(
    todo: list[dict],
    *,
    counter_ref,
    input_location: Location,
    output_location: Location,
    options: StorageOptions,
    overlays: bool,
    batch_size: int,
    concurrency: int,
    num_gpus: float = 0.0,
    cpus_per_actor: float = 1.0,
    validator: ImageValidator | None = None,
    collect_drift: bool = False,
):
    """Return the lazy Ray dataset of result rows for the images in ``todo``.

    Parameters
    ----------
    todo : list of dict
        Images to count, with keys ``file`` (name under the input prefix),
        ``fingerprint`` and ``size``.
    counter_ref : ray.ObjectRef
        The :class:`~ccflow.counter.CellCounter`, put in the object store once.
    validator : ccflow.validation.ImageValidator, optional
        Suite that each actor checks its batches against; None counts every image.
    collect_drift : bool
        Profile the counted images of each batch for drift scoring.

    Returns
    -------
    ray.data.Dataset
        One row per image: ``file``, ``fingerprint``, ``sha256``, ``row`` (JSON of the
        counts.csv row), ``cells`` (JSON list of cells.csv rows), ``<stage>_s``
        seconds for each stage in :data:`STAGES`, and ``drift``: on one row per actor
        batch that counted images, the JSON state of that batch's
        :class:`~ccflow.drift.DriftAccumulator`, else an empty string. A state has
        fixed-size histograms, about 1 kB of JSON, so the driver's memory stays bounded.
    """
    import ray

    blocks = min(MAX_BLOCKS, max(1, math.ceil(len(todo) / batch_size)))
    dataset = ray.data.from_items(todo, override_num_blocks=blocks)
    dataset = dataset.map_batches(
        read_batch,
        fn_kwargs={"location": input_location, "options": options},
        batch_size=batch_size,
        batch_format="pandas",
        num_cpus=READ_TASK_CPUS,
        compute=ray.data.TaskPoolStrategy(size=READ_TASKS_PER_ACTOR * concurrency),
    )
    return dataset.map_batches(
        ImageCounter,
        fn_constructor_kwargs={
            "counter_ref": counter_ref,
            "output_location": output_location,
            "options": options,
            "overlays": overlays,
            "threads": max(1, int(cpus_per_actor)),
            "device": "cuda" if num_gpus > 0 else "cpu",
            "validator": validator,
            "collect_drift": collect_drift,
        },
        batch_size=batch_size,
        batch_format="pandas",
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=cpus_per_actor,
        num_gpus=num_gpus,
    )


_STORAGE_CACHE: dict[tuple, Storage] = {}


def _cached_storage(location: Location, options: StorageOptions) -> Storage:
    # One client per worker process and location: creating a client costs a few requests.
    key = (location, options.s3_endpoint_url, options.gcs_endpoint)
    if key not in _STORAGE_CACHE:
        options.apply_environment()
        _STORAGE_CACHE[key] = open_storage(location, options)
    return _STORAGE_CACHE[key]


def read_batch(batch: pd.DataFrame, location: Location, options: StorageOptions) -> pd.DataFrame:
    """Add the bytes, SHA-256 and read error of each listed image to a batch (Ray task)."""
    storage = _cached_storage(location, options)
    contents, hashes, errors, seconds = [], [], [], []
    for name in batch["file"]:
        started = time.perf_counter()
        try:
            data = storage.read_bytes(name)
        except ObjectReadError as error:
            data, error_text = b"", f"{type(error).__name__}: {error}"
            logger.error("Could not read %s: %s", name, error)
        else:
            error_text = ""
        contents.append(data)
        hashes.append(hashlib.sha256(data).hexdigest() if data else "")
        errors.append(error_text)
        seconds.append(time.perf_counter() - started)
    return batch.assign(data=contents, sha256=hashes, read_error=errors, read_s=seconds)


def _encode_png(image) -> bytes:
    # OpenCV instead of ccflow.registry.encode_png, whose module imports MLflow: that
    # import takes seconds in each actor.
    import cv2

    ok, encoded = cv2.imencode(".png", image[:, :, ::-1])
    if not ok:
        raise ValueError(f"Could not encode an overlay of shape {image.shape} as PNG.")
    return encoded.tobytes()


class ImageCounter:
    """Ray Data actor: loads the model once, then checks and counts batches of image bytes."""

    def __init__(
        self,
        counter_ref,
        output_location: Location,
        options: StorageOptions,
        overlays: bool,
        threads: int = 1,
        device: str = "cpu",
        validator: ImageValidator | None = None,
        collect_drift: bool = False,
    ) -> None:
        import ray
        import torch

        torch.set_num_threads(threads)
        self.counter = ray.get(counter_ref) if isinstance(counter_ref, ray.ObjectRef) else counter_ref
        if device != self.counter.device:
            self.counter.model.to(device)
            self.counter.device = device
        self.overlays = overlays
        self.output = _cached_storage(output_location, options) if overlays else None
        self.validator = validator
        if validator is not None:
            validator.prepare()
        self.collect_drift = collect_drift

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        drift = DriftAccumulator() if self.collect_drift else None
        outcomes = self.count_batch(batch, drift)
        records = [self.write_overlay(outcome) for outcome in outcomes]
        results = pd.DataFrame.from_records(records, index=batch.index)
        # One state per batch, on its first row: the driver merges every non-empty one.
        results["drift"] = ""
        if drift is not None and drift.images:
            results.iloc[0, results.columns.get_loc("drift")] = json.dumps(drift.to_state())
        return pd.concat([batch[["file", "fingerprint", "sha256", "read_s"]], results], axis=1)

    def count_batch(self, batch: pd.DataFrame, drift: DriftAccumulator | None) -> list[ImageOutcome]:
        """Check and count the images of a batch that were read; return one outcome per row."""
        outcomes: dict[int, ImageOutcome] = {}
        items: list[tuple[str, bytes]] = []
        positions: list[int] = []
        for position, item in enumerate(batch.itertuples(index=False)):
            if item.read_error:
                outcomes[position] = ImageOutcome(row={"file": item.file, "status": "error", "error": item.read_error})
            else:
                items.append((item.file, item.data))
                positions.append(position)
        counted = count_images(self.counter, items, overlay=self.overlays, validator=self.validator, drift=drift)
        outcomes.update(zip(positions, counted, strict=True))
        return [outcomes[position] for position in range(len(batch))]

    def write_overlay(self, outcome: ImageOutcome) -> dict[str, Any]:
        """Write the overlay of a counted image; return the image's result columns."""
        started = time.perf_counter()
        if outcome.overlay is not None:
            self.output.write_bytes(overlay_name(outcome.row["file"]), _encode_png(outcome.overlay))
        overlay_seconds = time.perf_counter() - started

        columns = {"row": json.dumps(outcome.row), "cells": json.dumps(outcome.cells), "overlay_s": overlay_seconds}
        for stage in STAGES:
            if stage not in ("read", "overlay"):
                columns[f"{stage}_s"] = outcome.seconds.get(stage, 0.0)
        return columns


# --------------------------------------------------------------------------------------
# Output files and ledger
# --------------------------------------------------------------------------------------


class _OutputFiles:
    """counts.csv, cells.csv and ledger.csv in a local folder, mirrored to the output storage."""

    def __init__(self, work_dir: Path, storage: Storage, upload_interval_s: float) -> None:
        self.work_dir = Path(work_dir)
        self.storage = storage
        self.upload_interval_s = upload_interval_s
        self.mirrored = storage.location.scheme != "file"
        self.last_sync = time.monotonic()
        self.dirty = False
        self._files: dict[str, Any] = {}
        self._writers: dict[str, csv.DictWriter] = {}

    def path(self, name: str) -> Path:
        return self.work_dir / name

    def fetch(self) -> None:
        """Download the previous run's files from a bucket output."""
        self.work_dir.mkdir(parents=True, exist_ok=True)
        if not self.mirrored:
            return
        for name in (LEDGER_FILE, COUNTS_FILE, CELLS_FILE):
            if self.storage.download(name, self.path(name)):
                logger.info("Resuming from %s in %s", name, self.storage.location)

    def read_ledger(self) -> dict[str, str]:
        """Return the fingerprint of each finished image; later lines win."""
        finished: dict[str, str] = {}
        path = self.path(LEDGER_FILE)
        if path.is_file():
            with open(path, newline="") as file:
                for entry in csv.DictReader(file):
                    finished[entry["file"]] = entry["fingerprint"]
        return finished

    def compact(self, keep: set[str], reset: bool) -> None:
        """Keep only the ledger entries and CSV rows of the images in ``keep``.

        The ledger is rewritten first: a crash in between leaves CSV rows that the ledger
        does not list, and the next start drops them.
        """
        for name, columns in ((LEDGER_FILE, LEDGER_COLUMNS), (COUNTS_FILE, COUNTS_COLUMNS), (CELLS_FILE, CELLS_COLUMNS)):
            path = self.path(name)
            if reset or not path.is_file():
                _write_csv_header(path, columns)
                continue
            dropped = _filter_csv(path, columns, keep, latest_only=name == LEDGER_FILE)
            if dropped:
                logger.info("Dropped %d rows of unfinished or changed images from %s", dropped, name)
                self.dirty = True
        if reset:
            self.dirty = True

    def append(self, batch: pd.DataFrame, totals: JobTotals) -> None:
        """Append a batch of results: CSV rows first, flushed, then the ledger entries."""
        counts, cells, ledger = self._writer(COUNTS_FILE, COUNTS_COLUMNS), self._writer(CELLS_FILE, CELLS_COLUMNS), self._writer(LEDGER_FILE, LEDGER_COLUMNS)
        finished_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
        entries = []
        for item in batch.itertuples(index=False):
            row = json.loads(item.row)
            cells.writerows(json.loads(item.cells))
            counts.writerow(row)
            _add_to_totals(totals, row, item)
            entries.append(
                {"file": item.file, "fingerprint": item.fingerprint, "sha256": item.sha256,
                 "status": row["status"], "finished_at": finished_at}
            )
        self._files[CELLS_FILE].flush()
        self._files[COUNTS_FILE].flush()
        self._append_ledger(ledger, entries)
        self.dirty = True
        logger.info("%d of the images to count finished", totals.finished)

    def _append_ledger(self, ledger: csv.DictWriter, entries: list[dict]) -> None:
        ledger.writerows(entries)
        self._files[LEDGER_FILE].flush()

    def _writer(self, name: str, columns: list[str]) -> csv.DictWriter:
        if name not in self._writers:
            self._files[name] = open(self.path(name), "a", newline="")
            self._writers[name] = csv.DictWriter(self._files[name], columns, restval="")
        return self._writers[name]

    def close(self) -> None:
        for file in self._files.values():
            file.close()
        self._files.clear()
        self._writers.clear()

    def sync(self, force: bool = False) -> None:
        """Upload the files to a bucket output when due (or ``force``), the ledger last."""
        if not self.mirrored or not self.dirty:
            return
        if not force and time.monotonic() - self.last_sync < self.upload_interval_s:
            return
        for file in self._files.values():
            file.flush()
        for name in (CELLS_FILE, COUNTS_FILE, LEDGER_FILE):
            self.storage.upload(self.path(name), name)
        self.last_sync = time.monotonic()
        self.dirty = False
        logger.info("Uploaded %s, %s and %s to %s", CELLS_FILE, COUNTS_FILE, LEDGER_FILE, self.storage.location)


def _add_to_totals(totals: JobTotals, row: dict, item) -> None:
    status = row["status"]
    if status == "ok":
        totals.counted += 1
        totals.cells += int(row["count"])
    elif status == "invalid":
        totals.invalid += 1
    elif status == "skipped":
        totals.skipped += 1
    else:
        totals.failed += 1
    for stage in STAGES:
        totals.stage_seconds[stage] += float(getattr(item, f"{stage}_s"))


def _write_csv_header(path: Path, columns: list[str]) -> None:
    with open(path, "w", newline="") as file:
        csv.DictWriter(file, columns).writeheader()


def _filter_csv(path: Path, columns: list[str], keep: set[str], latest_only: bool) -> int:
    """Rewrite a CSV file with only the rows whose ``file`` is in ``keep``; return the rows dropped."""
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        rows: Iterable[dict] = (row for row in reader)
        if latest_only:
            latest: dict[str, dict] = {}
            for row in rows:
                latest[row["file"]] = row
            rows = latest.values()
        temporary = path.with_suffix(".tmp")
        kept = dropped = 0
        with open(temporary, "w", newline="") as out:
            writer = csv.DictWriter(out, columns, restval="", extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                if row["file"] in keep:
                    writer.writerow(row)
                    kept += 1
                else:
                    dropped += 1
    os.replace(temporary, path)
    return dropped


# --------------------------------------------------------------------------------------
# Drift
# --------------------------------------------------------------------------------------


def _drift_reference(model_uri: str) -> tuple[dict | None, str]:
    """Return the reference profile of the model, or None and why drift is not scored."""
    from mlflow.exceptions import MlflowException

    from ccflow.drift import load_reference

    try:
        return load_reference(model_uri), ""
    except (FileNotFoundError, ValueError, MlflowException) as error:
        reason = f"no drift reference: {getattr(error, 'message', error)}"
        logger.warning("Drift is not scored in this run, %s", reason)
        return None, reason


def _merge_drift(drift: DriftAccumulator, batch: pd.DataFrame) -> None:
    for state in batch["drift"]:
        if state:
            drift.merge(DriftAccumulator.from_state(json.loads(state)))


def _score_drift(
    drift: DriftAccumulator | None, reference: dict | None, threshold: float, reason: str
) -> tuple[DriftReport | None, str]:
    """Score the run's drift against the reference; return the report, or None and why."""
    if drift is None or reference is None:
        return None, reason
    if drift.images == 0:
        logger.info("No image was counted, so drift is not scored")
        return None, "no image was counted"
    try:
        report = drift.report(reference, threshold=threshold)
    except ValueError as error:
        # A profile logged by another ccflow version can have other bins.
        logger.warning("Drift is not scored in this run: %s", error)
        return None, str(error)

    if report.flagged:
        above = ", ".join(
            f"{name} {value:.3f}" for name, value in sorted(report.per_feature.items()) if value > threshold
        )
        logger.warning(
            "Drift flagged: overall PSI %.3f over %d images exceeds the threshold %.2f (%s). "
            "The images differ from the model's training images: check the microscope, "
            "staining and magnification, or retrain on such images.",
            report.overall, report.images, threshold, above,
        )
    return report, ""


def _drift_manifest(report: DriftReport | None, reason: str, threshold: float) -> dict[str, Any]:
    if report is None:
        return {"scored": False, "reason": reason, "threshold": threshold}
    return {
        "scored": True,
        "method": report.method,
        "threshold": report.threshold,
        "overall": round(report.overall, 4),
        "flagged": report.flagged,
        "per_feature": {name: round(value, 4) for name, value in report.per_feature.items()},
        "skipped_features": report.skipped,
        "images": report.images,
    }


# --------------------------------------------------------------------------------------
# Manifest, MLflow and energy
# --------------------------------------------------------------------------------------


def _describe_model(model_uri: str) -> dict[str, str | None]:
    """Return the registered name and version behind a ``models:/`` URI, when there is one."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    described: dict[str, str | None] = {"uri": model_uri, "name": None, "version": None}
    if not model_uri.startswith("models:/"):
        return described
    reference = model_uri[len("models:/"):]
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            version = MlflowClient().get_model_version_by_alias(name, alias).version
        else:
            name, _, version = reference.partition("/")
    except MlflowException as error:
        logger.warning("Cannot resolve the version of %s: %s", model_uri, error.message)
        return described
    described.update(name=name, version=str(version) if version else None)
    return described


def _energy_tracking(config: CountJobConfig, folder: Path):
    if not config.energy:
        from contextlib import nullcontext

        return nullcontext(None)
    from ccflow.energy import track_energy

    return track_energy("ccflow-count", folder, country_iso_code=config.country_iso_code)


def _manifest(config, model, input_location, output_location, started_at, seconds, totals, energy) -> dict:
    finished_at = datetime.now(timezone.utc)
    manifest = {
        "model_uri": model["uri"],
        "model_name": model["name"],
        "model_version": model["version"],
        "input": str(input_location),
        "output": str(output_location),
        "started_at": started_at.isoformat(timespec="seconds"),
        "finished_at": finished_at.isoformat(timespec="seconds"),
        "counting_seconds": round(seconds, 3),
        "images_listed": totals.listed,
        "images_counted": totals.counted,
        "images_failed": totals.failed,
        "images_invalid": totals.invalid,
        "images_skipped": totals.skipped,
        "cells": totals.cells,
        "images_per_s": round(totals.finished / seconds, 4) if totals.finished and seconds > 0 else 0.0,
        "stage_seconds": {stage: round(value, 3) for stage, value in totals.stage_seconds.items()},
        "settings": {
            "concurrency": config.concurrency,
            "num_gpus": config.num_gpus,
            "cpus_per_actor": config.cpus_per_actor,
            "batch_size": config.batch_size,
            "overlays": config.overlays,
            "recount": config.recount,
            "validate": config.validate,
            "drift_threshold": config.drift_threshold,
        },
        "energy": None,
    }
    if energy is not None:
        manifest["energy"] = {
            **{key: value for key, value in energy.to_dict().items() if key != "emissions_csv"},
            "energy_kwh_per_image": energy.energy_kwh / totals.counted if totals.counted else None,
            "emissions_kg_per_image": energy.emissions_kg / totals.counted if totals.counted else None,
        }
    return manifest


def _write_manifest(manifest: dict, work_dir: Path, storage: Storage, run_name: str, energy) -> None:
    path = work_dir / "runs" / f"{run_name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest, indent=2))
    if storage.location.scheme != "file":
        storage.upload(path, f"runs/{run_name}.json")
        if energy is not None and energy.emissions_csv is not None:
            storage.upload(Path(energy.emissions_csv), "runs/emissions.csv")
    logger.info("Run manifest: %s", storage.location.key(f"runs/{run_name}.json"))


def _log_mlflow_run(
    config: CountJobConfig, manifest: dict, energy, run_name: str, drift: DriftReport | None = None
) -> str | None:
    """Log the manifest's figures and the drift as an MLflow run; return its id (None without experiment).

    ``ccflow monitor`` reads the metrics ``cells``, ``images_counted`` and
    ``drift_overall`` and the tag ``drift_flagged`` of these runs.
    """
    if not config.experiment:
        return None
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param

    from ccflow.drift import log_drift
    from ccflow.energy import log_energy

    client = MlflowClient()
    # `mlflow run` starts the run itself and passes its id in MLFLOW_RUN_ID.
    run_id = os.environ.get("MLFLOW_RUN_ID")
    owns_run = not run_id
    if owns_run:
        experiment = client.get_experiment_by_name(config.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(config.experiment)
        run = client.create_run(experiment_id, run_name=f"count-{run_name}", tags={"ccflow.job": "count"})
        run_id = run.info.run_id

    params = {
        "model_uri": manifest["model_uri"],
        "model_name": manifest["model_name"],
        "model_version": manifest["model_version"],
        "input": manifest["input"],
        "output": manifest["output"],
        **manifest["settings"],
    }
    metric_names = ("images_listed", "images_counted", "images_failed", "images_invalid",
                    "images_skipped", "cells", "images_per_s", "counting_seconds")
    metrics = {name: manifest[name] for name in metric_names}
    metrics.update({f"{stage}_seconds": value for stage, value in manifest["stage_seconds"].items()})
    if manifest["energy"] and manifest["energy"]["energy_kwh_per_image"] is not None:
        metrics["energy_kwh_per_image"] = manifest["energy"]["energy_kwh_per_image"]
        metrics["co2_kg_per_image"] = manifest["energy"]["emissions_kg_per_image"]
    now = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(name, float(value), now, 0) for name, value in metrics.items()],
        params=[Param(name, str(value)) for name, value in params.items()],
    )
    if energy is not None:
        log_energy(energy, prefix="count_", client=client, run_id=run_id)
    if drift is not None:
        log_drift(drift, client, run_id)
    else:
        client.set_tag(run_id, "drift_skipped", manifest["drift"]["reason"])
    client.log_dict(run_id, manifest, "manifest.json")
    if owns_run:
        client.set_terminated(run_id, "FINISHED")
    logger.info("MLflow run %s", run_id)
    return run_id


def manifest_to_text(manifest: dict) -> str:
    """Return a one-line summary of a run manifest for the command line."""
    text = (
        f"Counted {manifest['images_counted']} images ({manifest['images_failed']} failed, "
        f"{manifest['images_invalid']} invalid, {manifest['images_skipped']} already counted, "
        f"{manifest['cells']} cells) into {manifest['output']}"
    )
    drift = manifest.get("drift") or {}
    if drift.get("scored"):
        verdict = "FLAGGED" if drift["flagged"] else "not flagged"
        text += f"; drift {drift['overall']:.3f} ({verdict}, threshold {drift['threshold']:g})"
    return text
