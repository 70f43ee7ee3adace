"""Leave-one-image-out accuracy of ccflow against the classical baseline.

For each labelled image, ccflow trains on the other images under a fixed wall-clock
budget (through the same ``ccflow.train.train`` as ``mlflow run .``), then counts the
held-out image. The classical Otsu-and-watershed pipeline labels the same image in the
same run. The script prints detection F1, segmentation F1 and count MAPE side by side,
per image and pooled, and writes them as JSON.

Usage (from the repository root, environment of the README set-up step)::

    python benchmarks/accuracy.py --data ../shared/data/fnc-yellow-sample

Runs go to a temporary SQLite MLflow backend unless ``--tracking-uri`` is given.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np

from ccflow.classical import classical_labels
from ccflow.data import list_samples, load_pair
from ccflow.metrics import image_metrics, label_mask, pooled_metrics
from ccflow.postprocess import label_cells
from ccflow.registry import load_counter
from ccflow.train import TrainConfig, train

logger = logging.getLogger("benchmarks.accuracy")

# The reference settings reproduce the published classical figures on the FNC sample
# (detection F1 about 0.60, MAPE about 97 %). The tuned settings suit cells of 20 to 60 px,
# so ccflow is also compared with a fair classical pipeline.
CLASSICAL_VARIANTS = {
    "classical_reference": dict(sigma=1.0, footprint_px=9),
    "classical_tuned": dict(sigma=2.0, footprint_px=40),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/fnc-yellow-sample"),
                        help="labelled folder with images/ and masks/")
    parser.add_argument("--minutes", type=float, default=TrainConfig.max_minutes,
                        help="training budget per fold, in minutes of wall-clock time "
                        "(default: the budget of a default training run)")
    parser.add_argument("--scale", type=float, default=0.5, help="resampling before the network")
    parser.add_argument("--loss", default="focal", help="training loss")
    parser.add_argument("--lr-schedule", default="plateau", choices=("plateau", "cosine"),
                        help="learning-rate schedule")
    parser.add_argument("--base-width", type=int, default=16, help="c-ResUnet base width")
    parser.add_argument("--crop-size", type=int, default=512, help="training crop side, original px")
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--folds", type=int, default=0,
                        help="run only the first N folds (0: all images)")
    parser.add_argument("--tracking-uri", default=None, help="MLflow tracking URI for the fold runs")
    parser.add_argument("--output", type=Path, default=None, help="write results as JSON here")
    return parser.parse_args()


def run_fold(args, samples, held_out, workdir: Path) -> dict:
    """Train without ``held_out`` and return the held-out labels of every method."""
    fold_dir = workdir / held_out.name
    for sub in ("images", "masks"):
        (fold_dir / sub).mkdir(parents=True, exist_ok=True)
    for sample in samples:
        if sample.name != held_out.name:
            (fold_dir / "images" / sample.image_path.name).symlink_to(sample.image_path.resolve())
            (fold_dir / "masks" / sample.mask_path.name).symlink_to(sample.mask_path.resolve())

    config = TrainConfig(
        data=fold_dir,
        loss=args.loss,
        lr_schedule=args.lr_schedule,
        base_width=args.base_width,
        crop_size=args.crop_size,
        scale=args.scale,
        seed=args.seed,
        epochs=1000,
        patience=15,
        max_minutes=args.minutes,
        threshold="auto",
        register=False,
        experiment="ccflow-benchmark-accuracy",
    )
    started = time.monotonic()
    result = train(config)
    train_seconds = time.monotonic() - started

    counter = load_counter(f"runs:/{result.run_id}/model")
    image, mask = load_pair(held_out)
    true_labels = label_mask(mask)
    started = time.monotonic()
    count = counter.count(image)
    predict_seconds = time.monotonic() - started

    rows = {"ccflow": image_metrics(true_labels, count.labels)}
    for name, settings in CLASSICAL_VARIANTS.items():
        rows[name] = image_metrics(true_labels, classical_labels(image, **settings))
    logger.info(
        "Fold %s: ccflow %d cells, true %d (threshold %.2f, %.0f s training)",
        held_out.name, count.count, rows["ccflow"]["true_count"], result.threshold, train_seconds,
    )
    return {
        "image": held_out.name,
        "run_id": result.run_id,
        "threshold": result.threshold,
        "train_seconds": train_seconds,
        "predict_seconds": predict_seconds,
        "rows": rows,
    }


def summarise(folds: list[dict]) -> dict[str, dict]:
    methods = folds[0]["rows"].keys()
    return {m: pooled_metrics([f["rows"][m] for f in folds]) for m in methods}


def print_report(folds: list[dict], pooled: dict[str, dict]) -> None:
    methods = list(pooled)
    header = f"{'image':32s} {'true':>5s} " + " ".join(f"{m + ' n':>22s}" for m in methods)
    print(header)
    for fold in folds:
        cells = " ".join(f"{fold['rows'][m]['pred_count']:>22d}" for m in methods)
        print(f"{fold['image']:32s} {fold['rows']['ccflow']['true_count']:>5d} {cells}")
    print()
    print(f"{'pooled over held-out images':32s} " + " ".join(f"{m:>22s}" for m in methods))
    for key, label in (("det_f1", "detection F1"), ("det_precision", "detection precision"),
                       ("det_recall", "detection recall"), ("seg_f1", "segmentation F1"),
                       ("count_mape", "count MAPE (%)"), ("count_mae", "count MAE")):
        print(f"{label:32s} " + " ".join(f"{pooled[m][key]:>22.3f}" for m in methods))
    for baseline in methods[1:]:
        f1_ratio = pooled["ccflow"]["det_f1"] / max(pooled[baseline]["det_f1"], 1e-9)
        mape_ratio = pooled["ccflow"]["count_mape"] / max(pooled[baseline]["count_mape"], 1e-9)
        print(f"ccflow / {baseline}: detection F1 x{f1_ratio:.2f}, count MAPE x{mape_ratio:.2f}")


def main() -> None:
    args = parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    workdir = Path(tempfile.mkdtemp(prefix="ccflow-accuracy-"))
    mlflow.set_tracking_uri(args.tracking_uri or f"sqlite:///{workdir / 'mlflow.db'}")
    mlflow.set_experiment("ccflow-benchmark-accuracy")

    samples = list_samples(args.data, require_masks=True)
    held_out = samples[: args.folds] if args.folds else samples
    started = time.monotonic()
    folds = [run_fold(args, samples, sample, workdir) for sample in held_out]
    pooled = summarise(folds)

    print()
    print(f"machine: {platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} CPUs; budget {args.minutes} min per fold, "
          f"scale {args.scale}, loss {args.loss}, {args.lr_schedule} schedule, "
          f"base width {args.base_width}; "
          f"total {(time.monotonic() - started) / 60:.1f} min")
    print_report(folds, pooled)
    if args.output:
        args.output.write_text(json.dumps(
            {"args": {k: str(v) for k, v in vars(args).items()}, "folds": folds, "pooled": pooled},
            indent=2, default=lambda v: v.item() if isinstance(v, np.generic) else str(v),
        ))


if __name__ == "__main__":
    main()
