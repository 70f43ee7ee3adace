"""Retrain on old plus new labelled images when recent counting runs are flagged for drift.

Meant for cron, after the counting job. The job retrains only when

1. the latest ``--last`` runs of the counting experiment all carry the tag
   ``drift_flagged=true`` (as :func:`ccflow.drift.log_drift` sets it), and
2. ``NEW_DATA`` contains labelled images (``images/`` and ``masks/``) that no earlier
   retraining used (compared by the content hash of the folder).

It then trains on the base data plus the new data and gives the new model version the
alias ``challenger``. It never moves ``champion``: promotion is a separate decision.

Example crontab line, at 04:00:

    0 4 * * * cd /srv/ccflow && .venv/bin/python jobs/retrain_on_drift.py /data/new-labels

Exit status: 0 when it retrained or had nothing to do, 2 on an error.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException

from ccflow import CHALLENGER_ALIAS, CHAMPION_ALIAS, REGISTERED_MODEL_NAME
from ccflow.data import Sample, dataset_fingerprint, list_samples
from ccflow.errors import CcflowError, DatasetError
from ccflow.monitor import COUNTING_EXPERIMENT
from ccflow.train import TrainConfig, train

logger = logging.getLogger("ccflow.jobs.retrain_on_drift")

NEW_DATA_TAG = "retrain_new_data_fingerprint"
TRIGGER_TAG = "retrain_trigger_runs"
# Newest counting runs searched for the ones that scored drift.
SEARCHED_RUNS = 200


def latest_runs_flagged(client, experiment: str, last: int) -> tuple[bool, list[str]]:
    """Return whether the ``last`` newest runs of ``experiment`` are all flagged, and their ids.

    Only runs that scored drift count: a nightly run with no new image, or one whose
    model has no reference profile, has no ``drift_flagged`` tag and is passed over, so
    it neither breaks nor extends a streak. Fewer than ``last`` scored runs, or a missing
    experiment, count as not flagged.
    """
    found = client.get_experiment_by_name(experiment)
    if found is None:
        logger.info("Counting experiment %r not found: nothing to check", experiment)
        return False, []
    recent = client.search_runs(
        [found.experiment_id], order_by=["attributes.start_time DESC"], max_results=SEARCHED_RUNS
    )
    runs = [run for run in recent if "drift_flagged" in run.data.tags][:last]
    run_ids = [run.info.run_id for run in runs]
    flags = [run.data.tags.get("drift_flagged") == "true" for run in runs]
    logger.info("Latest %d counting runs: %s", len(runs), ", ".join(
        f"{run_id[:8]} {'flagged' if flag else 'not flagged'}" for run_id, flag in zip(run_ids, flags, strict=True)
    ))
    return len(runs) == last and all(flags), run_ids


def combine_datasets(base: list[Sample], new: list[Sample], destination: Path) -> Path:
    """Link the images and masks of two datasets into one folder with ``images/`` and ``masks/``.

    A new sample replaces a base sample with the same name, because newer labels are
    assumed to be corrected ones.

    NOTE: the folder contains symbolic links, so on a multi-node Ray cluster both source
    folders must be on storage that every node mounts at the same path.
    """
    by_name = {sample.name: sample for sample in base}
    replaced = sorted(set(by_name) & {sample.name for sample in new})
    if replaced:
        logger.warning("New data replaces %d base images with the same name: %s", len(replaced), ", ".join(replaced))
    by_name.update({sample.name: sample for sample in new})

    for folder in ("images", "masks"):
        (destination / folder).mkdir(parents=True, exist_ok=False)
    for sample in by_name.values():
        (destination / "images" / sample.image_path.name).symlink_to(sample.image_path.resolve())
        (destination / "masks" / sample.mask_path.name).symlink_to(sample.mask_path.resolve())
    return destination


def champion_data_dir(client, model_name: str) -> Path:
    """Return the data folder the champion was trained on (its run's ``data_dir`` parameter)."""
    try:
        version = client.get_model_version_by_alias(model_name, CHAMPION_ALIAS)
    except MlflowException as error:
        raise CcflowError(
            f"Model {model_name!r} has no {CHAMPION_ALIAS!r} version to take the base data from. "
            f"Pass --base-data."
        ) from error
    data_dir = client.get_run(version.run_id).data.params.get("data_dir")
    if not data_dir or not Path(data_dir).is_dir():
        raise CcflowError(
            f"The {CHAMPION_ALIAS} (version {version.version}) was trained on {data_dir!r}, which is not "
            f"a folder here. Pass --base-data."
        )
    return Path(data_dir)


def already_used(client, model_name: str, fingerprint: str) -> str | None:
    """Return the model version that was already trained with this new data, if any."""
    for version in client.search_model_versions(f"name = '{model_name}'"):
        if version.tags.get(NEW_DATA_TAG) == fingerprint:
            return str(version.version)
    return None


def parse_train_options(options: list[str]) -> dict[str, Any]:
    """Turn ``KEY=VALUE`` texts into TrainConfig settings, typed like the field defaults."""
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    settings: dict[str, Any] = {}
    for option in options:
        key, separator, text = option.partition("=")
        if not separator or key not in defaults or key in ("data", "postprocess", "model_name"):
            raise ValueError(
                f"Invalid --train {option!r}: use KEY=VALUE with a TrainConfig field other than "
                f"data, postprocess and model_name, e.g. --train epochs=10."
            )
        default = defaults[key]
        if text == "auto":
            settings[key] = text
        elif isinstance(default, bool):
            settings[key] = text.lower() in ("1", "true", "yes")
        elif isinstance(default, int):
            settings[key] = int(text)
        elif isinstance(default, float):
            settings[key] = float(text)
        else:
            settings[key] = text
    return settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("new_data", type=Path, help="folder of new labelled images, with images/ and masks/")
    parser.add_argument(
        "--base-data",
        type=Path,
        help="labelled folder the current model was trained on (default: the data_dir of the champion's training run)",
    )
    parser.add_argument("--counting-experiment", default=COUNTING_EXPERIMENT, help="MLflow experiment of the counting runs")
    parser.add_argument("--last", type=int, default=3, help="retrain when this many newest counting runs are all flagged")
    parser.add_argument("--model-name", default=REGISTERED_MODEL_NAME, help="registered model to add the challenger to")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="empty or new folder for the combined dataset (default: a new temporary folder, kept after the run)",
    )
    parser.add_argument(
        "--train",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="training setting, repeatable, e.g. --train epochs=40 --train experiment=ccflow",
    )
    parser.add_argument("--force", action="store_true", help="retrain even when the counting runs are not flagged")
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Decide and, when needed, retrain; return a summary of the decision."""
    if args.last < 1:
        raise ValueError(f"--last must be at least 1 run, got {args.last}.")
    client = mlflow.MlflowClient()
    flagged, run_ids = latest_runs_flagged(client, args.counting_experiment, args.last)
    if not (flagged or args.force):
        return {"retrained": False, "reason": f"the latest {args.last} counting runs are not all flagged"}

    try:
        new_samples = list_samples(args.new_data, require_masks=True)
    except DatasetError as error:
        return {"retrained": False, "reason": f"no new labelled images: {error}"}
    fingerprint = dataset_fingerprint(new_samples)
    previous = already_used(client, args.model_name, fingerprint)
    if previous:
        return {"retrained": False, "reason": f"version {previous} was already trained with this new data"}

    base_dir = args.base_data or champion_data_dir(client, args.model_name)
    base_samples = list_samples(base_dir, require_masks=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="ccflow-retrain-"))
    combined = combine_datasets(base_samples, new_samples, workdir)
    logger.info(
        "Retraining on %d base and %d new images, combined in %s", len(base_samples), len(new_samples), combined
    )

    config = TrainConfig(data=combined, model_name=args.model_name, register=True, **parse_train_options(args.train))
    result = train(config)
    if result.model_version is None:
        raise CcflowError(f"Training run {result.run_id} registered no model version; check --train register.")

    client.set_registered_model_alias(args.model_name, CHALLENGER_ALIAS, result.model_version)
    client.set_model_version_tag(args.model_name, result.model_version, NEW_DATA_TAG, fingerprint)
    client.set_model_version_tag(args.model_name, result.model_version, TRIGGER_TAG, ",".join(run_ids))
    client.set_tag(result.run_id, "retrain_base_data", str(Path(base_dir).resolve()))
    client.set_tag(result.run_id, "retrain_new_data", str(Path(args.new_data).resolve()))
    client.set_tag(result.run_id, TRIGGER_TAG, ",".join(run_ids))
    logger.info(
        "Registered %s version %s as %s (run %s)", args.model_name, result.model_version, CHALLENGER_ALIAS, result.run_id
    )
    return {
        "retrained": True,
        "run_id": result.run_id,
        "model_version": result.model_version,
        "alias": CHALLENGER_ALIAS,
        "trigger_runs": run_ids,
        "metrics": result.metrics,
    }


def main(argv: list[str] | None = None) -> int:
    """Run the job; return the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args)
    except (CcflowError, MlflowException, ValueError) as error:
        logger.error("Retraining failed: %s", error)
        return 2
    logger.info("Retraining decision: %s", summary.get("reason", "retrained"))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
