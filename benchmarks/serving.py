"""Latency and throughput of a served ccflow model against its in-process predict.

The script logs a c-ResUnet with random weights (speed does not depend on the weights)
to a temporary SQLite MLflow backend, unless ``--model-uri`` names a model of an existing
backend. It sends each image of a folder, one image per request, first to the pyfunc
model's ``predict`` in this process, then to ``mlflow models serve`` on a free port of
127.0.0.1. It prints the median and 95th percentile latency, the throughput and the
ratio of the two paths. Requests are sequential, so throughput is 1 / mean latency.
Post-processing time grows with the foreground a model finds, so give ``--model-uri`` of a
trained model for figures that match real use.

Usage (from the repository root, environment of the README set-up step)::

    python benchmarks/serving.py --images ../shared/data/fnc-yellow-sample/images --rounds 5

A quick check of the script itself: ``--base-width 4 --rounds 1 --max-images 2``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import requests
import torch

from ccflow.count import list_images
from ccflow.model import build_model
from ccflow.postprocess import PostprocessConfig
from ccflow.registry import log_counter_model
from ccflow.serving import IMAGE_COLUMN, build_request, parse_response

logger = logging.getLogger("benchmarks.serving")

BENCHMARK_MODEL = "ccflow-serving-benchmark"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=Path("../shared/data/fnc-yellow-sample/images"),
                        help="folder of PNG or TIFF images to send")
    parser.add_argument("--rounds", type=int, default=5, help="passes over the images per path")
    parser.add_argument("--max-images", type=int, default=0, help="use only the first N images (0: all)")
    parser.add_argument("--overlay", action="store_true", help="also request the Grad-CAM overlay")
    parser.add_argument("--model-uri", default=None,
                        help="model to serve, e.g. models:/ccflow-cell-counter@champion "
                        "(needs --tracking-uri); default: a randomly initialised c-ResUnet")
    parser.add_argument("--tracking-uri", default=None, help="MLflow backend of --model-uri")
    parser.add_argument("--base-width", type=int, default=16, help="c-ResUnet base width of the default model")
    parser.add_argument("--scale", type=float, default=0.5, help="resampling factor of the default model")
    parser.add_argument("--output", type=Path, default=None, help="also write the results as JSON here")
    return parser.parse_args()


def log_default_model(root: Path, base_width: int, scale: float) -> str:
    """Register a randomly initialised c-ResUnet in a SQLite backend under ``root``."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    experiment = mlflow.create_experiment("serving-benchmark", artifact_location=(root / "artifacts").as_uri())
    torch.manual_seed(0)
    weights = root / "weights.pt"
    torch.save(build_model("c-resunet", base_width).state_dict(), weights)
    with mlflow.start_run(experiment_id=experiment):
        info = log_counter_model(
            weights=weights, arch="c-resunet", base_width=base_width, scale=scale,
            tile_size=512, postprocess=PostprocessConfig(), registered_model_name=BENCHMARK_MODEL,
        )
    return f"models:/{BENCHMARK_MODEL}/{info.registered_model_version}"


def time_in_process(model_uri: str, images: list[bytes], rounds: int, overlay: bool) -> list[float]:
    """Return the latency in seconds of each pyfunc predict call, one image per call."""
    model = mlflow.pyfunc.load_model(model_uri)
    model.predict(pd.DataFrame({IMAGE_COLUMN: images[:1]}), params={"overlay": overlay})  # warm-up
    latencies = []
    for _ in range(rounds):
        for data in images:
            started = time.perf_counter()
            model.predict(pd.DataFrame({IMAGE_COLUMN: [data]}), params={"overlay": overlay})
            latencies.append(time.perf_counter() - started)
    return latencies


def start_server(model_uri: str, tracking_uri: str, log_path: Path) -> tuple[subprocess.Popen, str]:
    """Start ``mlflow models serve`` on a free local port and wait for ``/ping``."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_REGISTRY_URI=tracking_uri,
               MLFLOW_DISABLE_TELEMETRY="true", NO_ALBUMENTATIONS_UPDATE="1")
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
               "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, env=env, stdout=log_path.open("wb"),
                               stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    session = _session()
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow models serve exited with {process.returncode}; see {log_path}")
        try:
            if session.get(url + "/ping", timeout=2).status_code == 200:
                return process, url
        except (requests.ConnectionError, requests.Timeout):
            pass  # not listening yet, or busy starting
        time.sleep(0.5)
    stop_server(process)
    raise TimeoutError(f"mlflow models serve: /ping did not return 200 within 300 s; see {log_path}")


def stop_server(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def _session() -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # never send the local requests through a proxy
    return session


def time_server(url: str, images: list[bytes], rounds: int, overlay: bool) -> list[float]:
    """Return the latency in seconds of each ``/invocations`` request, one image per request."""
    session = _session()
    bodies = [json.dumps(build_request([data], overlay=overlay)) for data in images]
    headers = {"Content-Type": "application/json"}

    def post(body: str) -> None:
        response = session.post(url + "/invocations", data=body, headers=headers, timeout=600)
        if response.status_code != 200:
            raise RuntimeError(f"The server returned HTTP {response.status_code}: {response.text[:500]}")
        parse_response(response.text)

    post(bodies[0])  # warm-up
    latencies = []
    for _ in range(rounds):
        for body in bodies:
            started = time.perf_counter()
            post(body)
            latencies.append(time.perf_counter() - started)
    return latencies


def summarise(latencies: list[float]) -> dict[str, float]:
    values = np.asarray(latencies)
    return {
        "requests": int(values.size),
        "median_ms": float(np.median(values) * 1000),
        "p95_ms": float(np.percentile(values, 95) * 1000),
        "images_per_s": float(values.size / values.sum()),
    }


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args()
    paths = list_images(args.images)
    if args.max_images:
        paths = paths[: args.max_images]
    images = [path.read_bytes() for path in paths]

    with tempfile.TemporaryDirectory(prefix="ccflow-serving-bench-") as directory:
        root = Path(directory)
        if args.model_uri:
            if not args.tracking_uri:
                raise SystemExit("--model-uri requires --tracking-uri: pass the MLflow backend that contains the model.")
            mlflow.set_tracking_uri(args.tracking_uri)
            mlflow.set_registry_uri(args.tracking_uri)
            model_uri, tracking_uri = args.model_uri, args.tracking_uri
        else:
            model_uri = log_default_model(root, args.base_width, args.scale)
            tracking_uri = mlflow.get_tracking_uri()

        logger.info("In-process predict of %s: %d images x %d rounds", model_uri, len(images), args.rounds)
        in_process = summarise(time_in_process(model_uri, images, args.rounds, args.overlay))

        process, url = start_server(model_uri, tracking_uri, root / "serve.log")
        try:
            logger.info("Server %s: %d images x %d rounds", url, len(images), args.rounds)
            served = summarise(time_server(url, images, args.rounds, args.overlay))
        finally:
            stop_server(process)

    results = {
        "model_uri": model_uri if args.model_uri else f"random c-ResUnet, base width {args.base_width}",
        "scale": args.scale,
        "overlay": args.overlay,
        "images": [path.name for path in paths],
        "rounds": args.rounds,
        "in_process": in_process,
        "server": served,
        "server_over_in_process_median": served["median_ms"] / in_process["median_ms"],
        "in_process_over_server_throughput": in_process["images_per_s"] / served["images_per_s"],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                   f"torch threads {torch.get_num_threads()}",
    }
    print(f"{'path':<12}{'median ms':>12}{'p95 ms':>12}{'images/s':>12}")
    for name in ("in_process", "server"):
        row = results[name]
        print(f"{name:<12}{row['median_ms']:>12.1f}{row['p95_ms']:>12.1f}{row['images_per_s']:>12.3f}")
    print(f"server / in-process median latency: {results['server_over_in_process_median']:.3f}")
    print(json.dumps(results, indent=2))
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
