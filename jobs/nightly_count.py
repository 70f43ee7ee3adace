"""Count the new and changed images under a folder or bucket prefix; meant for cron or Ray jobs.

INPUT and OUTPUT are local folders, gs://bucket/prefix or s3://bucket/prefix. OUTPUT keeps
one counts.csv, cells.csv, ledger.csv and overlays/ across runs, and one manifest per run
under runs/. A run counts only the images that the ledger does not list with the same
content, so a nightly schedule never counts an image twice, and a run that was killed
finishes the rest when started again.

Example crontab line, counting at 02:00 with the champion model:

    0 2 * * * cd /srv/ccflow && .venv/bin/python jobs/nightly_count.py gs://lab-images/incoming gs://lab-counts/nightly

On an existing Ray cluster:

    ray job submit --address http://HEAD:8265 --working-dir . -- python jobs/nightly_count.py s3://lab/in s3://lab/out

Exit status: 0 when every image was counted, 1 when some failed or were invalid, 2 when
the job itself failed (missing bucket, credentials or permission, model not found).
"""

from __future__ import annotations

import argparse
import logging
import sys

from mlflow.exceptions import MlflowException

from ccflow import REGISTERED_MODEL_NAME
from ccflow.batch import CountJobConfig, manifest_to_text, run_count_job
from ccflow.drift import DEFAULT_THRESHOLD
from ccflow.errors import CcflowError

logger = logging.getLogger("ccflow.jobs.nightly_count")


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """Parse the command line of the job."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="folder, gs://bucket/prefix or s3://bucket/prefix of PNG or TIFF images")
    parser.add_argument("output", help="folder or bucket prefix for the CSV files, overlays, ledger and manifests")
    parser.add_argument(
        "--model",
        default=f"models:/{REGISTERED_MODEL_NAME}@champion",
        help="MLflow model URI (default: the version with the champion alias)",
    )
    parser.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    parser.add_argument("--recount", action="store_true", help="ignore the ledger and count every image again")
    parser.add_argument("--no-validate", action="store_true",
                        help="count every image that decodes, without checking it against the counting suite")
    parser.add_argument("--drift-threshold", type=float, default=DEFAULT_THRESHOLD,
                        help=f"flag the run when its overall drift (PSI) exceeds this (default {DEFAULT_THRESHOLD})")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="counting actors (default: one per GPU share, or per CPU of the cluster)")
    parser.add_argument("--num-gpus", type=float, default=0.0, help="GPUs per actor (default 0: CPUs only)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0, help="CPUs and PyTorch threads per actor")
    parser.add_argument("--batch-size", type=int, default=4, help="images per batch handed to an actor")
    parser.add_argument("--s3-endpoint-url", default=None,
                        help="endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL, else AWS)")
    parser.add_argument("--experiment", default="ccflow-counting",
                        help="MLflow experiment of the job's run; empty logs no run")
    parser.add_argument("--no-energy", action="store_true", help="do not measure energy with CodeCarbon")
    parser.add_argument("--country", default=None, help="ISO 3166-1 alpha-3 code of the electricity grid for CO2")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the job and return its exit status."""
    args = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    config = CountJobConfig(
        input=args.input,
        output=args.output,
        model_uri=args.model,
        overlays=not args.no_overlays,
        # 0, the MLproject default, selects the automatic pool size like None.
        concurrency=args.concurrency or None,
        num_gpus=args.num_gpus,
        cpus_per_actor=args.cpus_per_actor,
        batch_size=args.batch_size,
        recount=args.recount,
        s3_endpoint_url=args.s3_endpoint_url or None,
        experiment=args.experiment or None,
        energy=not args.no_energy,
        validate=not args.no_validate,
        drift_threshold=args.drift_threshold,
    )
    if args.country:
        config.country_iso_code = args.country
    try:
        manifest = run_count_job(config)
    except (CcflowError, MlflowException, ValueError) as error:
        logger.error("Nightly count failed: %s", error)
        return 2
    logger.info("%s", manifest_to_text(manifest))
    return 1 if manifest["images_failed"] or manifest["images_invalid"] else 0


if __name__ == "__main__":
    sys.exit(main())
