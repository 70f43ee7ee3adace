"""Compare the Ray Data counting job with a plain in-process loop over the same images.

The FNC sample (four images) is repeated to ``--images`` files in a temporary folder.
Both paths use the same counter, image checks and post-processing through
:func:`ccflow.count.count_images`; ``--no-validate`` leaves out the checks in both.
The script prints images per second for both and their ratio, seconds per stage, and the
peak memory of a Ray job over ``--images`` and over ``--large-images`` images.

Full size, on a quiet machine (about 10 minutes on 2 cores with an untrained width-16 model):

    python benchmarks/batch.py --images 64 --large-images 500

Tiny check that the script runs:

    python benchmarks/batch.py --images 8 --large-images 16 --width 400 --base-width 4

Images narrower or lower than 256 px fail the size expectation of the counting suite and
are not counted, so keep ``--width`` at 400 or more, or pass ``--no-validate``.

Memory is the resident set size sampled every 0.2 s with psutil: of the driver alone, and
of the driver with every process it started (the Ray node and its workers). Shared memory
of the object store is counted in each process that maps it, so the total overstates
the real use; compare the two job sizes, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import cv2
import psutil

REPO_ROOT = Path(__file__).resolve().parents[1]
FNC_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "fnc-yellow-sample" / "images"

logger = logging.getLogger("ccflow.benchmarks.batch")


class PeakMemory:
    """Sample the resident memory of this process and of all its descendants in a thread."""

    def __init__(self, interval_s: float = 0.2) -> None:
        self.interval_s = interval_s
        self.driver_peak = 0
        self.total_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "PeakMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            driver = me.memory_info().rss
            total = driver
            for child in me.children(recursive=True):
                try:
                    total += child.memory_info().rss
                except psutil.Error:
                    continue
            self.driver_peak = max(self.driver_peak, driver)
            self.total_peak = max(self.total_peak, total)
            self._stop.wait(self.interval_s)


def make_images(folder: Path, count: int, width: int | None) -> None:
    """Write ``count`` PNG copies of the FNC sample, optionally resized to ``width`` pixels."""
    sources = sorted(FNC_SAMPLE.glob("*.png"))
    if not sources:
        sys.exit(f"FNC sample not found in {FNC_SAMPLE}.")
    encoded = []
    for path in sources:
        image = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if width:
            height = round(image.shape[0] * width / image.shape[1])
            image = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA)
        encoded.append(cv2.imencode(".png", image)[1].tobytes())
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / f"image_{index:05d}.png").write_bytes(encoded[index % len(encoded)])


def make_counter(args):
    """Load the model URI, or build an untrained c-ResUnet with the default post-processing."""
    if args.model:
        from ccflow.registry import load_counter

        return load_counter(args.model)
    import torch

    from ccflow.counter import CellCounter
    from ccflow.model import build_model
    from ccflow.postprocess import PostprocessConfig

    torch.manual_seed(0)
    return CellCounter(build_model("c-resunet", args.base_width), PostprocessConfig(), scale=args.scale)


def run_loop(counter, folder: Path, args) -> dict:
    """Count every image in this process, as ``ccflow.count.count_folder`` does.

    The images are checked in batches of ``--batch-size``, as the Ray job's actors check them.
    """
    from ccflow.count import STAGES, count_images
    from ccflow.validation import ImageValidator

    stages = dict.fromkeys(("read", *STAGES), 0.0)
    started = time.perf_counter()
    validator = None
    if not args.no_validate:
        validator = ImageValidator("counting")
        # Outside the stage timings but inside the wall time, as in the Ray job's actors.
        validator.prepare()
    paths = sorted(folder.iterdir())
    for first in range(0, len(paths), args.batch_size):
        read_started = time.perf_counter()
        items = [(path.name, path.read_bytes()) for path in paths[first : first + args.batch_size]]
        stages["read"] += time.perf_counter() - read_started
        for outcome in count_images(counter, items, overlay=args.overlays, validator=validator):
            for stage, seconds in outcome.seconds.items():
                stages[stage] += seconds
    seconds = time.perf_counter() - started
    return {"images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds, "stage_seconds": stages}


def run_ray(counter, folder: Path, output: Path, args) -> dict:
    """Count every image with the Ray Data job; return its figures and peak memory."""
    from ccflow.batch import CountJobConfig, run_count_job

    config = CountJobConfig(
        input=str(folder),
        output=str(output),
        model_uri=args.model or "untrained",
        overlays=args.overlays,
        concurrency=args.concurrency,
        batch_size=args.batch_size,
        recount=True,
        experiment=None,
        energy=False,
        validate=not args.no_validate,
    )
    with PeakMemory() as memory:
        started = time.perf_counter()
        manifest = run_count_job(config, counter=counter)
        seconds = time.perf_counter() - started
    images = manifest["images_counted"] + manifest["images_failed"] + manifest["images_invalid"]
    return {
        "images": images,
        "seconds": seconds,
        "images_per_s": images / seconds,
        "stage_seconds": manifest["stage_seconds"],
        "driver_peak_mib": memory.driver_peak / 2**20,
        "total_peak_mib": memory.total_peak / 2**20,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64, help="images of the speed comparison (default 64)")
    parser.add_argument("--large-images", type=int, default=500,
                        help="images of the second Ray job, for the memory comparison (default 500; 0 skips it)")
    parser.add_argument("--width", type=int, default=None, help="resize the images to this width in pixels (default: 1600, as stored)")
    parser.add_argument("--model", default=None, help="MLflow model URI; default: an untrained c-ResUnet")
    parser.add_argument("--base-width", type=int, default=16, help="width of the untrained c-ResUnet (default 16)")
    parser.add_argument("--scale", type=float, default=0.5, help="resampling factor of the untrained model (default 0.5)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs given to Ray (default: all)")
    parser.add_argument("--concurrency", type=int, default=None, help="counting actors (default: one per CPU)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per actor batch (default 4)")
    parser.add_argument("--overlays", action="store_true", help="also render and write Grad-CAM overlays")
    parser.add_argument("--no-validate", action="store_true",
                        help="skip the image checks of the counting suite in both paths")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

    import ray
    import torch

    root = Path(tempfile.mkdtemp(prefix="ccflow-bench-"))
    try:
        counter = make_counter(args)
        make_images(root / "images", args.images, args.width)

        loop = run_loop(counter, root / "images", args)
        ray.init(num_cpus=args.cpus, configure_logging=False, include_dashboard=False)
        job = run_ray(counter, root / "images", root / "out", args)
        results = {
            "machine": {"cpus": os.cpu_count(), "ray_cpus": args.cpus, "torch_threads": torch.get_num_threads()},
            "loop": loop,
            "ray": job,
            "ray_to_loop_ratio": job["images_per_s"] / loop["images_per_s"],
        }
        if args.large_images:
            make_images(root / "large", args.large_images, args.width)
            large = run_ray(counter, root / "large", root / "out-large", args)
            results["ray_large"] = large
            results["memory_ratio_large_to_small"] = large["total_peak_mib"] / job["total_peak_mib"]
        ray.shutdown()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(json.dumps(results, indent=2))
    print(
        f"loop {loop['images_per_s']:.3f} images/s, Ray {job['images_per_s']:.3f} images/s, "
        f"ratio {results['ray_to_loop_ratio']:.2f}"
    )
    if args.large_images:
        print(
            f"peak memory, driver and workers: {job['total_peak_mib']:.0f} MiB for {args.images} images, "
            f"{results['ray_large']['total_peak_mib']:.0f} MiB for {args.large_images} images"
        )


if __name__ == "__main__":
    main()
