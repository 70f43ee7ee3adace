"""Move the ``champion`` alias to a model version only when it counts at least as well.

The gate scores the candidate version and the current champion on the same labelled
images with :mod:`ccflow.evaluate`, and promotes the candidate when neither score is worse
beyond its tolerance:

- detection F1: ``candidate >= champion - tolerance_f1``;
- count MAPE (percent): ``candidate <= champion + tolerance_mape``.

A forced promotion skips the comparison but still scores both versions and must give a
reason. Every decision is recorded as tags under ``promotion.`` on the candidate version,
which the MLflow UI shows on the version page. It is also recorded as a run in the
experiment ``ccflow-promotion``, so earlier decisions stay readable after a later
attempt overwrites the tags.
"""

from __future__ import annotations

import datetime as dt
import getpass
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from ccflow import (
    CHALLENGER_ALIAS,
    CHAMPION_ALIAS,
    DEFAULT_TOLERANCE_F1,
    DEFAULT_TOLERANCE_MAPE,
    REGISTERED_MODEL_NAME,
)
from ccflow.data import dataset_fingerprint, list_samples, load_pair
from ccflow.errors import CcflowError, DatasetError
from ccflow.evaluate import predict_probabilities, score_probabilities
from ccflow.registry import load_counter

logger = logging.getLogger(__name__)

PROMOTION_EXPERIMENT = "ccflow-promotion"
TAG_PREFIX = "promotion."

Decision = Literal["promoted", "rejected", "forced", "unchanged"]
GATE_METRICS = ("det_f1", "count_mape")


class PromotionError(CcflowError):
    """A promotion request that cannot be carried out as given."""


@dataclass
class PromotionResult:
    """Outcome of one promotion request.

    Attributes
    ----------
    model_name, version : str
        The candidate model version.
    decision : {"promoted", "rejected", "forced", "unchanged"}
        ``unchanged`` means the candidate already was the champion.
    reason : str
        Why the gate decided so, or the reason given for a forced promotion.
    candidate_metrics, champion_metrics : dict of str to float
        Pooled metrics of :func:`ccflow.metrics.pooled_metrics`; ``champion_metrics`` is
        empty when there was no champion.
    champion_version : str or None
        The champion before the request.
    data_fingerprint : str
        :func:`ccflow.data.dataset_fingerprint` of the evaluation images.
    run_id : str or None
        The MLflow run that records the decision.
    """

    model_name: str
    version: str
    decision: Decision
    reason: str
    candidate_metrics: dict[str, float] = field(default_factory=dict)
    champion_metrics: dict[str, float] = field(default_factory=dict)
    champion_version: str | None = None
    data_fingerprint: str = ""
    run_id: str | None = None

    @property
    def champion_changed(self) -> bool:
        """True when the ``champion`` alias now points at the candidate."""
        return self.decision in ("promoted", "forced")


@dataclass
class LabelledSet:
    """Images, masks and fingerprint of an evaluation folder, read once for both models."""

    folder: Path
    names: list[str]
    images: list
    masks: list
    fingerprint: str

    @classmethod
    def read(cls, folder: Path) -> "LabelledSet":
        """Read a folder with ``images/`` and ``masks/``.

        Raises
        ------
        ccflow.errors.DatasetError
            The folder is missing, has images without masks, or has no annotated cell, so
            count MAPE would be undefined.
        """
        samples = list_samples(folder, require_masks=True)
        pairs = [load_pair(sample) for sample in samples]
        masks = [pair[1] for pair in pairs]
        if not any(mask.any() for mask in masks):
            raise DatasetError(
                f"{folder}: no mask contains a cell, so count MAPE is undefined. Evaluate "
                "on images with annotated cells."
            )
        return cls(
            folder=Path(folder),
            names=[sample.name for sample in samples],
            images=[pair[0] for pair in pairs],
            masks=masks,
            fingerprint=dataset_fingerprint(samples),
        )


def evaluate_version(model_name: str, version: str, data: LabelledSet) -> dict[str, float]:
    """Score one registered model version on a labelled set with its own post-processing.

    Returns
    -------
    dict of str to float
        The pooled metrics of :func:`ccflow.metrics.pooled_metrics`.
    """
    counter = load_counter(f"models:/{model_name}/{version}")
    probabilities = predict_probabilities(
        counter.model, data.images, scale=counter.scale, tile_size=counter.tile_size
    )
    evaluation = score_probabilities(data.names, probabilities, data.masks, counter.postprocess)
    pooled = {key: float(value) for key, value in evaluation.pooled.items()}
    logger.info(
        "%s version %s on %s: detection F1 %.4f, count MAPE %.2f %%",
        model_name, version, data.folder, pooled["det_f1"], pooled["count_mape"],
    )
    return pooled


def compare(
    candidate: dict[str, float],
    champion: dict[str, float],
    *,
    tolerance_f1: float = DEFAULT_TOLERANCE_F1,
    tolerance_mape: float = DEFAULT_TOLERANCE_MAPE,
) -> tuple[bool, str]:
    """Apply the gate to two sets of pooled metrics.

    Parameters
    ----------
    candidate, champion : dict
        Pooled metrics with ``det_f1`` (0 to 1) and ``count_mape`` (percent).
    tolerance_f1 : float
        Largest allowed drop of detection F1, in F1 units.
    tolerance_mape : float
        Largest allowed rise of count MAPE, in percentage points.

    Returns
    -------
    tuple of (bool, str)
        Whether the candidate passes, and a sentence that gives both scores.
    """
    f1_floor = champion["det_f1"] - tolerance_f1
    mape_ceiling = champion["count_mape"] + tolerance_mape
    failures = []
    if not candidate["det_f1"] >= f1_floor:
        failures.append(
            f"detection F1 {candidate['det_f1']:.4f} is below the champion's "
            f"{champion['det_f1']:.4f} minus the tolerance {tolerance_f1}"
        )
    if not candidate["count_mape"] <= mape_ceiling:
        failures.append(
            f"count MAPE {candidate['count_mape']:.2f} % is above the champion's "
            f"{champion['count_mape']:.2f} % plus the tolerance {tolerance_mape}"
        )
    if failures:
        return False, "Rejected: " + "; ".join(failures) + "."
    return True, (
        f"Passed: detection F1 {candidate['det_f1']:.4f} against {champion['det_f1']:.4f}, "
        f"count MAPE {candidate['count_mape']:.2f} % against {champion['count_mape']:.2f} %."
    )


def promote(
    version: str | int,
    data: Path,
    *,
    model_name: str = REGISTERED_MODEL_NAME,
    tolerance_f1: float = DEFAULT_TOLERANCE_F1,
    tolerance_mape: float = DEFAULT_TOLERANCE_MAPE,
    force: bool = False,
    reason: str | None = None,
    user: str | None = None,
) -> PromotionResult:
    """Evaluate a model version against the champion and move ``champion`` if it passes.

    Parameters
    ----------
    version : str or int
        The candidate version of ``model_name``.
    data : Path
        Labelled folder with ``images/`` and ``masks/``, held out from the training of
        both versions. Both versions are scored on exactly these images.
    model_name : str
        Registered model name.
    tolerance_f1, tolerance_mape : float
        See :func:`compare`.
    force : bool
        Promote whatever the scores are. Requires ``reason``.
    reason : str, optional
        Why the promotion is forced; recorded on the version and in the decision run.
    user : str, optional
        Who requests the promotion; defaults to the login name of the current process.

    Returns
    -------
    PromotionResult

    Raises
    ------
    PromotionError
        ``force`` without a reason, or a negative tolerance.
    mlflow.exceptions.MlflowException
        The version does not exist.
    ccflow.errors.DatasetError
        The folder cannot be used for evaluation.

    Notes
    -----
    When no version carries ``champion`` yet, the candidate becomes champion after its
    own evaluation. A rejected candidate gets the ``challenger`` alias; a promoted one
    loses it.
    """
    version = str(version)
    reason = (reason or "").strip()
    if force and not reason:
        raise PromotionError("--force needs --reason TEXT: say why the gate is overridden.")
    if tolerance_f1 < 0 or tolerance_mape < 0:
        raise PromotionError(
            f"Tolerances must be 0 or more, got tolerance_f1={tolerance_f1} and "
            f"tolerance_mape={tolerance_mape}."
        )

    client = MlflowClient()
    client.get_model_version(model_name, version)  # raises when the version is missing
    champion_version = _current_champion(client, model_name)
    if champion_version == version:
        return PromotionResult(
            model_name, version, "unchanged", f"Version {version} already is the champion.",
            champion_version=champion_version,
        )

    labelled = LabelledSet.read(Path(data))
    candidate_metrics = evaluate_version(model_name, version, labelled)
    champion_metrics = (
        evaluate_version(model_name, champion_version, labelled) if champion_version else {}
    )

    if force:
        decision, explanation = "forced", reason
    elif champion_version is None:
        decision, explanation = "promoted", "No champion yet: the first evaluated version becomes champion."
    else:
        passed, explanation = compare(
            candidate_metrics, champion_metrics,
            tolerance_f1=tolerance_f1, tolerance_mape=tolerance_mape,
        )
        decision = "promoted" if passed else "rejected"

    result = PromotionResult(
        model_name=model_name,
        version=version,
        decision=decision,
        reason=explanation,
        candidate_metrics=candidate_metrics,
        champion_metrics=champion_metrics,
        champion_version=champion_version,
        data_fingerprint=labelled.fingerprint,
    )
    tags = _decision_tags(result, labelled.folder, user or _login_name(), tolerance_f1, tolerance_mape)
    result.run_id = _log_decision_run(result, tags)
    tags[f"{TAG_PREFIX}run_id"] = result.run_id
    _apply(client, result, tags)
    return result


def _current_champion(client: MlflowClient, model_name: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(model_name, CHAMPION_ALIAS).version)
    except MlflowException as error:
        # A missing alias and a missing registered model both mean "no champion yet".
        if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _login_name() -> str:
    # getpass.getuser raises OSError in containers whose user id has no passwd entry.
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return os.environ.get("USER", "unknown")


def _decision_tags(
    result: PromotionResult, folder: Path, user: str, tolerance_f1: float, tolerance_mape: float
) -> dict[str, str]:
    tags = {
        "decision": result.decision,
        "reason": result.reason,
        "user": user,
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "data": str(folder.resolve()),
        "data_fingerprint": result.data_fingerprint,
        "tolerance_f1": str(tolerance_f1),
        "tolerance_mape": str(tolerance_mape),
        "champion_version": result.champion_version or "none",
    }
    for role, metrics in (("candidate", result.candidate_metrics), ("champion", result.champion_metrics)):
        for key in GATE_METRICS:
            if key in metrics:
                tags[f"{role}_{key}"] = _format(metrics[key])
    return {f"{TAG_PREFIX}{key}": value for key, value in tags.items()}


def _format(value: float) -> str:
    return "nan" if math.isnan(value) else f"{value:.4f}"


def _log_decision_run(result: PromotionResult, tags: dict[str, str]) -> str:
    # A separate experiment keeps decision runs out of the training runs' comparisons.
    # The run is started through the client, so the caller's active run, if any, is left alone.
    client = MlflowClient()
    experiment = client.get_experiment_by_name(PROMOTION_EXPERIMENT)
    experiment_id = (
        experiment.experiment_id if experiment else client.create_experiment(PROMOTION_EXPERIMENT)
    )
    run = client.create_run(
        experiment_id,
        run_name=f"{result.model_name}-v{result.version}-{result.decision}",
        tags={**tags, "model_name": result.model_name, "model_version": result.version},
    )
    metrics = {f"candidate_{k}": v for k, v in result.candidate_metrics.items()}
    metrics.update({f"champion_{k}": v for k, v in result.champion_metrics.items()})
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


def _apply(client: MlflowClient, result: PromotionResult, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(result.model_name, result.version, key, value)

    if result.champion_changed:
        client.set_registered_model_alias(result.model_name, CHAMPION_ALIAS, result.version)
        _drop_challenger_if(client, result.model_name, result.version)
        logger.info(
            "%s version %s is now %s (%s, previous champion %s): %s",
            result.model_name, result.version, CHAMPION_ALIAS, result.decision,
            result.champion_version or "none", result.reason,
        )
    else:
        client.set_registered_model_alias(result.model_name, CHALLENGER_ALIAS, result.version)
        logger.warning(
            "%s version %s stays %s; champion is still version %s. %s",
            result.model_name, result.version, CHALLENGER_ALIAS, result.champion_version,
            result.reason,
        )


def _drop_challenger_if(client: MlflowClient, model_name: str, version: str) -> None:
    try:
        challenger = client.get_model_version_by_alias(model_name, CHALLENGER_ALIAS)
    except MlflowException:
        return
    if str(challenger.version) == version:
        client.delete_registered_model_alias(model_name, CHALLENGER_ALIAS)
