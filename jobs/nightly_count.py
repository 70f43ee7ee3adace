"""Count the images of a folder into a dated output folder; meant for cron.

Example crontab line, counting at 02:00 with the champion model:

    0 2 * * * cd /srv/ccflow && .venv/bin/python jobs/nightly_count.py /data/incoming /data/counts

Each run writes ``OUTPUT_ROOT/<UTC date>/counts.csv``, ``cells.csv`` and ``overlays/``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

from mlflow.exceptions import MlflowException

from ccflow import REGISTERED_MODEL_NAME
from ccflow.count import count_folder
from ccflow.errors import CcflowError
from ccflow.registry import load_counter

logger = logging.getLogger("ccflow.jobs.nightly_count")


def main(argv: list[str] | None = None) -> int:
    """Run the job; return 0 when every image was counted, 1 when some failed, 2 on errors."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input_dir", type=Path, help="folder of PNG or TIFF images")
    parser.add_argument("output_root", type=Path, help="folder that receives one dated subfolder per run")
    parser.add_argument(
        "--model",
        default=f"models:/{REGISTERED_MODEL_NAME}@champion",
        help="MLflow model URI (default: the version with the champion alias)",
    )
    parser.add_argument("--no-overlays", action="store_true", help="skip the overlay PNGs")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    output_dir = args.output_root / datetime.now(timezone.utc).strftime("%Y-%m-%d")
    try:
        counter = load_counter(args.model)
        summary = count_folder(args.input_dir, output_dir, counter, overlays=not args.no_overlays)
    except (CcflowError, MlflowException) as error:
        logger.error("Nightly count failed: %s", error)
        return 2
    return 1 if summary.failed else 0


if __name__ == "__main__":
    sys.exit(main())
