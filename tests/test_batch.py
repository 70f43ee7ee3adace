"""The Ray Data counting job bucket to bucket, against a GCS emulator and moto's S3 server.

The images are the four FNC sample images shrunk to 400 x 300 pixels, so that each run
predicts in seconds on a CPU.
"""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import cv2
import mlflow
import numpy as np
import pandas as pd
import pytest
import tifffile
from typer.testing import CliRunner

from ccflow.batch import CountJobConfig, _OutputFiles, run_count_job
from ccflow.cli import app
from ccflow.storage import BucketNotFoundError
from tests.conftest import FNC_SAMPLE_COUNTS, REPO_ROOT, TEST_EXPERIMENT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

NAMES = sorted(FNC_SAMPLE_COUNTS)
WIDTH, HEIGHT = 400, 300


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def storage_environment():
    """Test credentials, and no path for either client to reach a cloud metadata server."""
    values = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "GCE_METADATA_HOST": f"127.0.0.1:{_free_port()}",
        "GCE_METADATA_IP": f"127.0.0.1:{_free_port()}",
        "NO_GCE_CHECK": "true",
    }
    previous = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    yield
    for name, value in previous.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def gcs_endpoint(storage_environment):
    """A gcp-storage-emulator server on 127.0.0.1, set as STORAGE_EMULATOR_HOST."""
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    previous = os.environ.get("STORAGE_EMULATOR_HOST")
    os.environ["STORAGE_EMULATOR_HOST"] = endpoint
    yield endpoint
    if previous is None:
        os.environ.pop("STORAGE_EMULATOR_HOST", None)
    else:
        os.environ["STORAGE_EMULATOR_HOST"] = previous
    server.stop()


@pytest.fixture(scope="module")
def s3_endpoint(storage_environment):
    """A moto S3 server on 127.0.0.1; the tests pass its URL with --s3-endpoint-url."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="module")
def small_images(fnc_sample_dir) -> dict[str, bytes]:
    """PNG bytes of the four FNC sample images at 400 x 300, by file name."""
    images = {}
    for name in NAMES:
        image = cv2.imread(str(fnc_sample_dir / "images" / f"{name}.png"), cv2.IMREAD_COLOR)
        small = cv2.resize(image, (WIDTH, HEIGHT), interpolation=cv2.INTER_AREA)
        images[f"{name}.png"] = cv2.imencode(".png", small)[1].tobytes()
    return images


def _gcs_client(endpoint):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    return storage.Client(
        project="ccflow-tests", credentials=AnonymousCredentials(), client_options={"api_endpoint": endpoint}
    )


def _s3_client(endpoint):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def _as_16bit_tiff(png: bytes) -> bytes:
    rgb = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, rgb.astype(np.uint16) * 257, photometric="rgb")
    return buffer.getvalue()


def _count(arguments):
    result = CliRunner().invoke(app, ["count", *arguments, "--experiment", TEST_EXPERIMENT, "--batch-size", "2"])
    return result


def _manifests(read_text, names):
    return [json.loads(read_text(name)) for name in sorted(names)]


# --------------------------------------------------------------------------------------
# GCS to GCS
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gcs_runs(gcs_endpoint, small_images, trained_fnc_model):
    """Two runs gs://ccflow-in/plate1 -> gs://ccflow-out/results; one object is corrupt."""
    client = _gcs_client(gcs_endpoint)
    source = client.create_bucket("ccflow-in")
    client.create_bucket("ccflow-out")
    for name, data in small_images.items():
        source.blob(f"plate1/{name}").upload_from_string(data)
    source.blob("plate1/broken.png").upload_from_string(small_images[f"{NAMES[0]}.png"][:1500])
    source.blob("notes/readme.txt").upload_from_string(b"not an image")

    arguments = ["gs://ccflow-in/plate1", "gs://ccflow-out/results", "--model", trained_fnc_model.model_uri]
    first = _count(arguments)
    second = _count([*arguments, "--no-energy"])
    return client.bucket("ccflow-out"), first, second


def _read_gcs_csv(bucket, name):
    return pd.read_csv(io.BytesIO(bucket.blob(f"results/{name}").download_as_bytes()))


def test_gcs_first_run_reports_failure(gcs_runs):
    _, first, _ = gcs_runs

    assert first.exit_code == 1, first.output
    assert "Counted 4 images (1 failed" in first.output


def test_gcs_counts_csv_has_every_image(gcs_runs):
    bucket, _, _ = gcs_runs
    counts = _read_gcs_csv(bucket, "counts.csv").set_index("file")

    assert sorted(counts.index) == sorted([*(f"{n}.png" for n in NAMES), "broken.png"])
    assert counts.loc["broken.png", "status"] == "error"
    assert "broken.png" in counts.loc["broken.png", "error"]
    ok = counts[counts["status"] == "ok"]
    assert len(ok) == 4
    assert (ok["width"] == WIDTH).all()
    assert (ok["height"] == HEIGHT).all()


def test_gcs_cells_csv_matches_counts(gcs_runs):
    bucket, _, _ = gcs_runs
    counts = _read_gcs_csv(bucket, "counts.csv")
    cells = _read_gcs_csv(bucket, "cells.csv")
    per_file = cells.groupby("file").size()

    for row in counts[counts["status"] == "ok"].itertuples():
        assert per_file.get(row.file, 0) == row.count


def test_gcs_overlays_written(gcs_runs):
    bucket, _, _ = gcs_runs
    names = sorted(blob.name for blob in bucket.list_blobs(prefix="results/overlays/"))

    assert names == sorted(f"results/overlays/{n}.png" for n in NAMES)
    overlay = cv2.imdecode(np.frombuffer(bucket.blob(names[0]).download_as_bytes(), np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == (HEIGHT, WIDTH, 3)


def test_gcs_second_run_counts_nothing(gcs_runs):
    bucket, _, second = gcs_runs
    runs = [blob.name for blob in bucket.list_blobs(prefix="results/runs/") if blob.name.endswith(".json")]
    first_manifest, second_manifest = _manifests(lambda n: bucket.blob(n).download_as_text(), runs)

    assert second.exit_code == 0, second.output
    assert first_manifest["images_counted"] == 4
    assert first_manifest["images_failed"] == 1
    assert second_manifest["images_counted"] == 0
    assert second_manifest["images_failed"] == 0
    assert second_manifest["images_skipped"] == 5
    assert len(_read_gcs_csv(bucket, "counts.csv")) == 5


def test_gcs_manifest_has_model_and_energy(gcs_runs, trained_fnc_model):
    bucket, _, _ = gcs_runs
    runs = [blob.name for blob in bucket.list_blobs(prefix="results/runs/") if blob.name.endswith(".json")]
    manifest = _manifests(lambda n: bucket.blob(n).download_as_text(), runs)[0]

    assert manifest["model_uri"] == trained_fnc_model.model_uri
    assert manifest["input"] == "gs://ccflow-in/plate1"
    assert manifest["images_per_s"] > 0
    assert manifest["energy"]["energy_kwh"] >= 0
    assert set(manifest["stage_seconds"]) == {"read", "decode", "validate", "count", "drift", "overlay"}


def test_gcs_run_logged_to_mlflow(gcs_runs):
    bucket, _, _ = gcs_runs
    runs = [blob.name for blob in bucket.list_blobs(prefix="results/runs/") if blob.name.endswith(".json")]
    manifest = _manifests(lambda n: bucket.blob(n).download_as_text(), runs)[0]

    run = mlflow.get_run(manifest["mlflow_run_id"])

    assert run.data.metrics["images_counted"] == 4
    assert run.data.metrics["images_failed"] == 1
    assert "count_energy_kwh" in run.data.metrics
    assert run.data.params["input"] == "gs://ccflow-in/plate1"


def test_gcs_missing_bucket_fails_fast(gcs_endpoint, trained_fnc_model):
    result = _count(["gs://ccflow-absent/x", "gs://ccflow-out/y", "--model", trained_fnc_model.model_uri])

    assert result.exit_code == 2
    with pytest.raises(BucketNotFoundError, match="gs://ccflow-absent not found"):
        run_count_job(CountJobConfig("gs://ccflow-absent/x", "gs://ccflow-out/y", trained_fnc_model.model_uri))


# --------------------------------------------------------------------------------------
# S3 to S3
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_runs(s3_endpoint, small_images, trained_fnc_model):
    """A run over three PNGs, a 16-bit TIFF copy of one, then a run after one image changed."""
    client = _s3_client(s3_endpoint)
    client.create_bucket(Bucket="lab-images")
    client.create_bucket(Bucket="lab-counts")
    for name in NAMES[:3]:
        client.put_object(Bucket="lab-images", Key=f"2026/{name}.png", Body=small_images[f"{name}.png"])
    tiff = _as_16bit_tiff(small_images[f"{NAMES[0]}.png"])
    client.put_object(Bucket="lab-images", Key="2026/sixteen_bit.tif", Body=tiff)

    arguments = [
        "s3://lab-images/2026", "s3://lab-counts/nightly", "--model", trained_fnc_model.model_uri,
        "--s3-endpoint-url", s3_endpoint, "--no-energy",
    ]
    first = _count(arguments)
    first_counts = _read_s3_csv(client, "counts.csv")
    # Replace one image with another one's content: only that image is counted again.
    client.put_object(Bucket="lab-images", Key=f"2026/{NAMES[1]}.png", Body=small_images[f"{NAMES[3]}.png"])
    second = _count(arguments)
    return client, first, first_counts, second


def _read_s3_csv(client, name):
    body = client.get_object(Bucket="lab-counts", Key=f"nightly/{name}")["Body"].read()
    return pd.read_csv(io.BytesIO(body))


def test_s3_counts_png_and_16bit_tiff(s3_runs):
    _, first, counts, _ = s3_runs
    counts = counts.set_index("file")

    assert first.exit_code == 0, first.output
    assert sorted(counts.index) == sorted([*(f"{n}.png" for n in NAMES[:3]), "sixteen_bit.tif"])
    assert (counts["status"] == "ok").all()
    assert counts.loc["sixteen_bit.tif", "width"] == WIDTH
    assert counts.loc["sixteen_bit.tif", "count"] == counts.loc[f"{NAMES[0]}.png", "count"]


def test_s3_overlays_written(s3_runs):
    client, _, _, _ = s3_runs
    listed = client.list_objects_v2(Bucket="lab-counts", Prefix="nightly/overlays/")
    names = sorted(item["Key"] for item in listed.get("Contents", []))

    assert names == sorted(
        [*(f"nightly/overlays/{n}.png" for n in NAMES[:3]), "nightly/overlays/sixteen_bit.png"]
    )


def test_s3_changed_image_recounted_once(s3_runs):
    client, _, first_counts, second = s3_runs
    counts = _read_s3_csv(client, "counts.csv")
    ledger = _read_s3_csv(client, "ledger.csv")

    assert second.exit_code == 0, second.output
    assert "Counted 1 images" in second.output
    assert "3 already counted" in second.output
    assert sorted(counts["file"]) == sorted(first_counts["file"])
    changed = counts.set_index("file").loc[f"{NAMES[1]}.png"]
    assert changed["status"] == "ok"
    assert ledger["file"].value_counts().max() == 1


def test_s3_missing_bucket_fails_fast(s3_endpoint, trained_fnc_model):
    config = CountJobConfig(
        "s3://lab-absent/x", "s3://lab-counts/y", trained_fnc_model.model_uri, s3_endpoint_url=s3_endpoint
    )

    with pytest.raises(BucketNotFoundError, match="s3://lab-absent not found"):
        run_count_job(config)


# --------------------------------------------------------------------------------------
# Local folders: interrupted and restarted
# --------------------------------------------------------------------------------------


class _Interrupted(Exception):
    pass


def test_interrupted_run_restarts_exactly_once(small_images, trained_fnc_model, tmp_path, monkeypatch):
    source = tmp_path / "in"
    source.mkdir()
    for name, data in small_images.items():
        (source / name).write_bytes(data)
    output = tmp_path / "out"
    config = CountJobConfig(
        str(source), str(output), trained_fnc_model.model_uri,
        batch_size=1, concurrency=1, experiment=None, energy=False, overlays=False,
    )

    # The second batch fails after its CSV rows were written but before its ledger entry,
    # as a job killed between the two writes would.
    original = _OutputFiles._append_ledger
    calls = []

    def append_then_fail(self, ledger, entries):
        calls.append(len(entries))
        if len(calls) == 2:
            raise _Interrupted("killed")
        original(self, ledger, entries)

    monkeypatch.setattr(_OutputFiles, "_append_ledger", append_then_fail)
    with pytest.raises(_Interrupted):
        run_count_job(config)
    monkeypatch.setattr(_OutputFiles, "_append_ledger", original)

    interrupted_ledger = pd.read_csv(output / "ledger.csv")
    interrupted_counts = pd.read_csv(output / "counts.csv")
    assert len(interrupted_ledger) == 1
    assert len(interrupted_counts) == 2

    manifest = run_count_job(config)

    counts = pd.read_csv(output / "counts.csv")
    cells = pd.read_csv(output / "cells.csv")
    ledger = pd.read_csv(output / "ledger.csv")
    assert manifest["images_counted"] == 3
    assert manifest["images_skipped"] == 1
    assert sorted(counts["file"]) == sorted(small_images)
    assert sorted(ledger["file"]) == sorted(small_images)
    per_file = cells.groupby("file").size()
    for row in counts.itertuples():
        assert per_file.get(row.file, 0) == row.count


COUNT_SCRIPT = textwrap.dedent(
    """
    import sys
    import ray
    from ccflow.batch import CountJobConfig, run_count_job

    ray.init(address=sys.argv[1], configure_logging=False)
    run_count_job(CountJobConfig(sys.argv[2], sys.argv[3], sys.argv[4], batch_size=1,
                                 concurrency=1, experiment=None, energy=False, overlays=False))
    """
)


def _ledger_rows(output) -> int:
    path = output / "ledger.csv"
    if not path.is_file():
        return 0
    return max(0, len(path.read_text().splitlines()) - 1)


def test_killed_job_restarts_exactly_once(small_images, trained_fnc_model, ray_cluster, mlflow_backend, tmp_path):
    import ray

    # Twelve images give the kill a window of several batches after the first one ends.
    source = tmp_path / "in"
    source.mkdir()
    for copy in range(3):
        for name, data in small_images.items():
            (source / f"copy{copy}_{name}").write_bytes(data)
    names = sorted(p.name for p in source.iterdir())
    output = tmp_path / "out"
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_backend, "PYTHONPATH": str(REPO_ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", COUNT_SCRIPT, ray.get_runtime_context().gcs_address,
         str(source), str(output), trained_fnc_model.model_uri],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 600
        while _ledger_rows(output) == 0 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert process.poll() is None, "the job ended before it could be killed"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    finished_before_kill = _ledger_rows(output)
    # Ray frees the killed driver's actors once it notices the driver is gone.
    deadline = time.monotonic() + 120
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.5)

    manifest = run_count_job(CountJobConfig(
        str(source), str(output), trained_fnc_model.model_uri,
        batch_size=4, concurrency=1, experiment=None, energy=False, overlays=False,
    ))

    counts = pd.read_csv(output / "counts.csv")
    cells = pd.read_csv(output / "cells.csv")
    ledger = pd.read_csv(output / "ledger.csv")
    assert 0 < finished_before_kill < len(names)
    assert manifest["images_skipped"] == finished_before_kill
    assert manifest["images_counted"] == len(names) - finished_before_kill
    assert sorted(counts["file"]) == names
    assert sorted(ledger["file"]) == names
    per_file = cells.groupby("file").size()
    for row in counts.itertuples():
        assert per_file.get(row.file, 0) == row.count
