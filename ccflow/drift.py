"""Profile images and predictions, and score how far new images drift from a reference.

Method: population stability index (PSI) per feature, on histograms with fixed bins, so
that a counting run accumulates in bounded memory whatever its number of images. With
reference proportions ``p`` and current proportions ``q`` over the bins of a feature,

    PSI = sum_i (q_i - p_i) * ln(q_i / p_i),

after every proportion is floored at ``1e-4`` (and renormalised) so that empty bins stay
finite. The overall score is the largest per-feature PSI, and a run is flagged when it
exceeds the threshold, by default 0.25. PSI is commonly read as no shift below 0.1, a
moderate shift from 0.1 to 0.25 and a major shift above 0.25.

NOTE: PSI treats pixels as independent, but pixels of one image are correlated, so a run
of very few images can pass 0.25 through normal image-to-image variation alone (two of
the four FNC sample images scored 0.61 against all four). Raise the threshold for small
runs.

Features (histogram bins are fixed in :data:`FEATURE_BINS`):

- ``intensity_red``, ``intensity_green``, ``intensity_blue``: pixel values per channel in
  [0, 1] of full scale, 32 bins equally spaced in the square root of the value, which
  resolves the dark background of fluorescence images. Pixels are subsampled on a regular
  grid to at most about 250 000 per image.
- ``hue``: hue in degrees of the coloured pixels (maximum channel at least 0.15 and
  chroma at least 0.05), 36 bins of 10 degrees.
- ``foreground_fraction``: pixels inside and outside predicted cells (2 bins).
- ``cell_area``: predicted cell areas in original pixels, 24 bins equally spaced in log2
  from 16 to 65 536 px (values outside are clipped to the end bins).

The reference of a model comes from its training run (:func:`log_training_reference`):
the image features from every labelled image of the run, the prediction features
(``foreground_fraction``, ``cell_area``) from the model's own predictions on the
validation images, so that both sides of a comparison come from the same model.
A feature with fewer than ``min_count`` observations on either side (for example fewer
than 50 cells) is skipped rather than scored, because PSI on small samples is noise.
"""

from __future__ import annotations

import logging
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ccflow.data import Sample, read_image, to_float

logger = logging.getLogger(__name__)

PROFILE_ARTIFACT = "reference_profile.json"
PROFILE_FORMAT = 1
METHOD = "psi"
DEFAULT_THRESHOLD = 0.25
DEFAULT_MIN_COUNT = 50
PROPORTION_FLOOR = 1e-4

MAX_PIXELS_PER_IMAGE = 250_000
HUE_MIN_VALUE = 0.15
HUE_MIN_CHROMA = 0.05
MAX_REFERENCE_PREDICTIONS = 16
"""At most this many validation images are predicted for a reference profile."""

CHANNELS = ("red", "green", "blue")

FEATURE_BINS: dict[str, np.ndarray] = {
    **{f"intensity_{name}": np.linspace(0.0, 1.0, 33) ** 2 for name in CHANNELS},
    "hue": np.linspace(0.0, 360.0, 37),
    "foreground_fraction": np.array([0.0, 0.5, 1.0]),
    "cell_area": 2.0 ** np.linspace(4.0, 16.0, 25),
}
PREDICTION_FEATURES = ("foreground_fraction", "cell_area")


@dataclass
class DriftReport:
    """Drift of a set of images against a reference profile.

    Attributes
    ----------
    per_feature : dict of str to float
        PSI of each scored feature.
    overall : float
        Largest per-feature PSI, or 0.0 when no feature could be scored.
    flagged : bool
        True when ``overall`` exceeds ``threshold``.
    method : str
        ``"psi"``.
    threshold : float
        Threshold the run was flagged against.
    skipped : dict of str to str
        Features that were not scored, with the reason.
    images : int
        Number of images accumulated.
    """

    per_feature: dict[str, float]
    overall: float
    flagged: bool
    method: str
    threshold: float
    skipped: dict[str, str] = field(default_factory=dict)
    images: int = 0

    def metrics(self) -> dict[str, float]:
        """Return ``drift_overall`` and ``drift_<feature>`` values for MLflow."""
        values = {f"drift_{name}": value for name, value in self.per_feature.items()}
        values["drift_overall"] = self.overall
        return values


class DriftAccumulator:
    """Histograms of the drift features over a stream of images, in bounded memory.

    Use one accumulator per counting run (or per Ray actor, then :meth:`merge`), call
    :meth:`update` once per image, and :meth:`report` at the end. :meth:`to_profile`
    turns an accumulator into a JSON-ready reference profile.
    """

    def __init__(self) -> None:
        self.counts = {name: np.zeros(len(edges) - 1, dtype=np.int64) for name, edges in FEATURE_BINS.items()}
        self.images = 0
        self.labelled_images = 0
        # Per channel: pixel count, sum, sum of squares, minimum and maximum.
        self.pixels = 0
        self.sums = np.zeros(3)
        self.squares = np.zeros(3)
        self.minimum = np.full(3, np.inf)
        self.maximum = np.full(3, -np.inf)

    def update(self, image: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Add one image and, optionally, its predicted label image.

        Parameters
        ----------
        image : numpy.ndarray
            Raw (uint8 or uint16) or float image in [0, 1], shape (H, W, 3).
        labels : numpy.ndarray, optional
            int label image (H, W) at the image's size, 0 for background and 1..n for
            cells, such as :attr:`ccflow.counter.CountResult.labels`. Without it the
            prediction features are not updated.
        """
        image = to_float(image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"image: expected shape (H, W, 3), got {image.shape}.")
        stride = max(1, math.ceil(math.sqrt(image.shape[0] * image.shape[1] / MAX_PIXELS_PER_IMAGE)))
        pixels = image[::stride, ::stride].reshape(-1, 3)

        for index, name in enumerate(CHANNELS):
            values = pixels[:, index]
            self._add(f"intensity_{name}", values)
            self.sums[index] += float(values.sum(dtype=np.float64))
            self.squares[index] += float(np.square(values, dtype=np.float64).sum())
            self.minimum[index] = min(self.minimum[index], float(values.min()))
            self.maximum[index] = max(self.maximum[index], float(values.max()))
        self.pixels += len(pixels)

        value = pixels.max(axis=1)
        coloured = (value >= HUE_MIN_VALUE) & (value - pixels.min(axis=1) >= HUE_MIN_CHROMA)
        if coloured.any():
            hsv = cv2.cvtColor(np.ascontiguousarray(pixels[coloured][None]), cv2.COLOR_RGB2HSV)
            self._add("hue", hsv[0, :, 0])

        if labels is not None:
            if labels.shape != image.shape[:2]:
                raise ValueError(f"labels: shape {labels.shape} differs from the image's {image.shape[:2]}.")
            inside = int(np.count_nonzero(labels))
            self.counts["foreground_fraction"] += [labels.size - inside, inside]
            areas = np.bincount(labels.ravel().astype(np.int64))[1:]
            self._add("cell_area", areas[areas > 0].astype(np.float64))
            self.labelled_images += 1
        self.images += 1

    def _add(self, name: str, values: np.ndarray) -> None:
        edges = FEATURE_BINS[name]
        clipped = np.clip(values, edges[0], edges[-1])
        self.counts[name] += np.histogram(clipped, bins=edges)[0]

    def merge(self, other: DriftAccumulator) -> DriftAccumulator:
        """Add the histograms of ``other`` (for example from another Ray actor) and return self."""
        for name in self.counts:
            self.counts[name] += other.counts[name]
        self.images += other.images
        self.labelled_images += other.labelled_images
        self.pixels += other.pixels
        self.sums += other.sums
        self.squares += other.squares
        self.minimum = np.minimum(self.minimum, other.minimum)
        self.maximum = np.maximum(self.maximum, other.maximum)
        return self

    def to_state(self) -> dict[str, Any]:
        """Return the full state as JSON-ready values, to send an accumulator between processes.

        Unlike :meth:`to_profile`, the state keeps the channel sums, so that
        ``from_state(a.to_state()).merge(b)`` equals ``a.merge(b)`` exactly. An
        accumulator without pixels stores its minimum and maximum as infinities, which
        :func:`json.dumps` writes as ``Infinity``.
        """
        return {
            "counts": {name: counts.tolist() for name, counts in self.counts.items()},
            "images": self.images,
            "labelled_images": self.labelled_images,
            "pixels": self.pixels,
            "sums": self.sums.tolist(),
            "squares": self.squares.tolist(),
            "minimum": self.minimum.tolist(),
            "maximum": self.maximum.tolist(),
        }

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> DriftAccumulator:
        """Rebuild an accumulator from :meth:`to_state` output of the same ccflow version."""
        accumulator = cls()
        for name, counts in state["counts"].items():
            accumulator.counts[name] = np.asarray(counts, dtype=np.int64)
        accumulator.images = int(state["images"])
        accumulator.labelled_images = int(state["labelled_images"])
        accumulator.pixels = int(state["pixels"])
        for name in ("sums", "squares", "minimum", "maximum"):
            setattr(accumulator, name, np.asarray(state[name], dtype=np.float64))
        return accumulator

    def to_profile(self) -> dict[str, Any]:
        """Return the accumulated histograms and channel statistics as a JSON-ready profile."""
        statistics = {}
        for index, name in enumerate(CHANNELS):
            count = max(self.pixels, 1)
            mean = self.sums[index] / count
            variance = max(self.squares[index] / count - mean**2, 0.0)
            statistics[name] = {
                "mean": float(mean),
                "std": math.sqrt(variance),
                "min": float(self.minimum[index]) if self.pixels else None,
                "max": float(self.maximum[index]) if self.pixels else None,
            }
        return {
            "format": PROFILE_FORMAT,
            "method": METHOD,
            "images": self.images,
            "labelled_images": self.labelled_images,
            "pixels": self.pixels,
            "channel_statistics": statistics,
            "features": {
                name: {"edges": FEATURE_BINS[name].tolist(), "counts": counts.tolist()}
                for name, counts in self.counts.items()
            },
            "notes": "Intensities are fractions of full scale. Prediction features come from "
            "the model's labels; see ccflow.drift for the bins and the method.",
        }

    @classmethod
    def from_profile(cls, profile: dict[str, Any]) -> DriftAccumulator:
        """Rebuild an accumulator from :meth:`to_profile` output (channel statistics excepted)."""
        if profile.get("format") != PROFILE_FORMAT:
            raise ValueError(
                f"Reference profile format {profile.get('format')!r} is not supported; expected "
                f"{PROFILE_FORMAT}. Retrain the model to log a current profile."
            )
        accumulator = cls()
        for name, feature in profile["features"].items():
            if name not in FEATURE_BINS:
                logger.warning("Reference profile feature %r is unknown and ignored", name)
                continue
            if not np.allclose(feature["edges"], FEATURE_BINS[name]):
                raise ValueError(
                    f"Reference profile feature {name!r} has other bins than this ccflow "
                    f"version uses. Retrain the model to log a current profile."
                )
            accumulator.counts[name] = np.asarray(feature["counts"], dtype=np.int64)
        accumulator.images = int(profile.get("images", 0))
        accumulator.labelled_images = int(profile.get("labelled_images", 0))
        return accumulator

    def report(
        self,
        reference: dict[str, Any] | DriftAccumulator,
        *,
        threshold: float = DEFAULT_THRESHOLD,
        min_count: int = DEFAULT_MIN_COUNT,
    ) -> DriftReport:
        """Score the accumulated images against a reference profile.

        Parameters
        ----------
        reference : dict or DriftAccumulator
            Reference profile, as :func:`load_reference` returns it.
        threshold : float
            The run is flagged when the overall PSI exceeds this value; raise it to
            flag fewer runs.
        min_count : int
            Features with fewer observations on either side are skipped.

        Returns
        -------
        DriftReport
        """
        if not threshold > 0:
            raise ValueError(f"threshold must be greater than 0, got {threshold}.")
        if isinstance(reference, dict):
            reference = DriftAccumulator.from_profile(reference)

        scores: dict[str, float] = {}
        skipped: dict[str, str] = {}
        for name in FEATURE_BINS:
            current_total = int(self.counts[name].sum())
            reference_total = int(reference.counts[name].sum())
            if min(current_total, reference_total) < min_count:
                skipped[name] = (
                    f"too few observations (reference {reference_total}, current {current_total}, "
                    f"minimum {min_count})"
                )
                continue
            scores[name] = population_stability_index(reference.counts[name], self.counts[name])

        overall = max(scores.values(), default=0.0)
        report = DriftReport(
            per_feature=scores,
            overall=overall,
            flagged=overall > threshold,
            method=METHOD,
            threshold=threshold,
            skipped=skipped,
            images=self.images,
        )
        logger.info(
            "Drift over %d images: overall PSI %.3f (threshold %.2f, %s)",
            self.images, overall, threshold, "flagged" if report.flagged else "not flagged",
        )
        return report


def population_stability_index(reference: np.ndarray, current: np.ndarray) -> float:
    """Compute the PSI between two histograms with the same bins.

    Parameters
    ----------
    reference, current : numpy.ndarray
        Counts per bin, same length, each with a positive total.

    Returns
    -------
    float
        ``sum((q - p) * ln(q / p))`` over the bins, with the proportions ``p`` and ``q``
        floored at :data:`PROPORTION_FLOOR` and renormalised. 0 for identical histograms.
    """
    reference = np.asarray(reference, dtype=np.float64)
    current = np.asarray(current, dtype=np.float64)
    if reference.shape != current.shape:
        raise ValueError(f"histograms differ in length: {reference.shape} and {current.shape}.")
    if reference.sum() <= 0 or current.sum() <= 0:
        raise ValueError("both histograms need a positive total count.")
    p = np.maximum(reference / reference.sum(), PROPORTION_FLOOR)
    q = np.maximum(current / current.sum(), PROPORTION_FLOOR)
    p, q = p / p.sum(), q / q.sum()
    return float(np.sum((q - p) * np.log(q / p)))


# --------------------------------------------------------------------------------------
# Reference profiles in MLflow
# --------------------------------------------------------------------------------------


def build_reference_profile(samples: list[Sample], predict_samples: list[Sample], counter) -> dict[str, Any]:
    """Profile the images of ``samples`` and the predictions of ``counter`` on ``predict_samples``.

    Parameters
    ----------
    samples : list of ccflow.data.Sample
        Images whose intensity and hue features form the reference.
    predict_samples : list of ccflow.data.Sample
        Images that ``counter`` predicts for the prediction features; at most
        :data:`MAX_REFERENCE_PREDICTIONS` of them are used.
    counter : ccflow.counter.CellCounter
        The model whose predictions are profiled.

    Returns
    -------
    dict
        Profile as :meth:`DriftAccumulator.to_profile` returns it, with the names of the
        images in ``"images_used"`` and ``"predicted_images"``.
    """
    images = DriftAccumulator()
    for sample in samples:
        images.update(read_image(sample.image_path))

    predictions = DriftAccumulator()
    predicted = predict_samples[:MAX_REFERENCE_PREDICTIONS]
    for sample in predicted:
        image = read_image(sample.image_path)
        predictions.update(image, counter.count(image).labels)

    for name in PREDICTION_FEATURES:
        images.counts[name] = predictions.counts[name]
    images.labelled_images = predictions.labelled_images
    profile = images.to_profile()
    profile["images_used"] = [sample.name for sample in samples]
    profile["predicted_images"] = [sample.name for sample in predicted]
    return profile


def log_training_reference(samples, val_samples, weights: Path, config, postprocess) -> dict[str, Any]:
    """Build the reference profile of a training run and log it to the active MLflow run.

    Parameters
    ----------
    samples : list of ccflow.data.Sample
        Every labelled image of the run.
    val_samples : list of ccflow.data.Sample
        Validation images, predicted with the trained model.
    weights : pathlib.Path
        State-dict file of the trained model.
    config : ccflow.train.TrainConfig
        Training settings; ``arch``, ``base_width``, ``scale`` and ``tile_size`` are used.
    postprocess : ccflow.postprocess.PostprocessConfig
        Post-processing of the logged model, its threshold included.

    Returns
    -------
    dict
        The profile, also logged as the artifact :data:`PROFILE_ARTIFACT`.
    """
    import mlflow

    import torch

    from ccflow.counter import CellCounter

    device = "cuda" if config.use_gpu is not False and torch.cuda.is_available() else "cpu"
    counter = CellCounter.from_files(
        Path(weights),
        {
            "arch": config.arch,
            "base_width": config.base_width,
            "scale": config.scale,
            "tile_size": config.tile_size,
            "postprocess": postprocess.to_dict(),
        },
        device=device,
    )
    profile = build_reference_profile(list(samples), list(val_samples), counter)
    mlflow.log_dict(profile, PROFILE_ARTIFACT)
    logger.info(
        "Logged the drift reference of %d images (%d predicted) as %s",
        len(profile["images_used"]), len(profile["predicted_images"]), PROFILE_ARTIFACT,
    )
    return profile


_MODEL_ID = re.compile(r"^m-[0-9a-f]+$")


def model_run_id(model_uri: str, client=None) -> str:
    """Return the id of the MLflow run that logged the model of ``model_uri``.

    Accepts ``models:/<name>/<version>``, ``models:/<name>@<alias>``,
    ``models:/<model id>`` (MLflow 3 logged models) and ``runs:/<run id>/<path>``.

    Raises
    ------
    ValueError
        If the URI has another form.
    mlflow.exceptions.MlflowException
        If the model, version or alias does not exist.
    """
    import mlflow

    client = client or mlflow.MlflowClient()
    if model_uri.startswith("runs:/"):
        return model_uri[len("runs:/") :].split("/", 1)[0]
    if not model_uri.startswith("models:/"):
        raise ValueError(f"Unsupported model URI {model_uri!r}: use models:/NAME/VERSION, models:/NAME@ALIAS or runs:/RUN_ID/PATH.")
    path = model_uri[len("models:/") :].strip("/")
    if "@" in path:
        name, alias = path.split("@", 1)
        return client.get_model_version_by_alias(name, alias).run_id
    if "/" in path:
        name, version = path.split("/", 1)
        return client.get_model_version(name, version).run_id
    if _MODEL_ID.match(path):
        return client.get_logged_model(path).source_run_id
    raise ValueError(f"Unsupported model URI {model_uri!r}: give a version or an alias, e.g. models:/{path}/1.")


def load_reference(model_uri: str, client=None) -> dict[str, Any]:
    """Load the reference profile logged with the training run of a model.

    Parameters
    ----------
    model_uri : str
        Model URI as :func:`model_run_id` accepts it, e.g. ``models:/ccflow-cell-counter@champion``.

    Returns
    -------
    dict
        The profile, to pass to :meth:`DriftAccumulator.report`.

    Raises
    ------
    FileNotFoundError
        If the training run has no :data:`PROFILE_ARTIFACT` (models trained before ccflow
        logged drift references).
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    run_id = model_run_id(model_uri, client)
    try:
        return mlflow.artifacts.load_dict(f"runs:/{run_id}/{PROFILE_ARTIFACT}")
    except (MlflowException, OSError) as error:
        raise FileNotFoundError(
            f"Model {model_uri!r}: its training run {run_id} has no {PROFILE_ARTIFACT}. "
            f"Retrain the model with this ccflow version to log a drift reference."
        ) from error


def log_drift(report: DriftReport, client, run_id: str) -> None:
    """Log a drift report to an MLflow run.

    Logs the metrics ``drift_overall`` and ``drift_<feature>`` of each scored feature, the
    tag ``drift_flagged`` (``"true"`` or ``"false"``) and the tags ``drift_method`` and
    ``drift_threshold``.

    Parameters
    ----------
    report : DriftReport
    client : mlflow.MlflowClient
    run_id : str
        Run to log to, usually the counting run.
    """
    from mlflow.entities import Metric, RunTag

    timestamp = int(time.time() * 1000)
    metrics = [Metric(key, float(value), timestamp, 0) for key, value in report.metrics().items()]
    tags = [
        RunTag("drift_flagged", "true" if report.flagged else "false"),
        RunTag("drift_method", report.method),
        RunTag("drift_threshold", str(report.threshold)),
    ]
    client.log_batch(run_id, metrics=metrics, tags=tags)
