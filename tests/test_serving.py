"""`mlflow models serve` of the champion: counts of the FNC sample, overlays, client errors."""

import base64
import json
import sys

import mlflow
import numpy as np
import pandas as pd
import pytest

from ccflow import CHAMPION_ALIAS, REGISTERED_MODEL_NAME
from ccflow.count import count_folder
from ccflow.registry import encode_png, load_counter
from ccflow.serving import build_request, parse_response
from tests.conftest import FNC_SAMPLE_COUNTS
from tests.local_server import LocalServer, free_port, http_session, mlflow_environment

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

# A byte limit below the default keeps the oversized request of the test small. The
# largest FNC sample image has 1.6 MB.
MAX_IMAGE_MEGABYTES = 3


@pytest.fixture(scope="module")
def champion_version(trained_fnc_model):
    client = mlflow.MlflowClient()
    client.set_registered_model_alias(
        REGISTERED_MODEL_NAME, CHAMPION_ALIAS, trained_fnc_model.model_version
    )
    return trained_fnc_model.model_version


@pytest.fixture(scope="module")
def server(champion_version, mlflow_backend, tmp_path_factory):
    port = free_port()
    command = [
        sys.executable, "-m", "mlflow", "models", "serve",
        "-m", f"models:/{REGISTERED_MODEL_NAME}@{CHAMPION_ALIAS}",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port),
    ]
    env = mlflow_environment(mlflow_backend, CCFLOW_MAX_IMAGE_MEGABYTES=str(MAX_IMAGE_MEGABYTES))
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    server = LocalServer(command, env, log_path, f"http://127.0.0.1:{port}")
    try:
        server.wait_until_ready("/ping", timeout_s=180)
        yield server
    finally:
        server.stop()


def _post(server, body, content_type="application/json"):
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return http_session().post(
        server.url + "/invocations", data=data, headers={"Content-Type": content_type}, timeout=300
    )


def _sample_bytes(fnc_sample_dir, names):
    return [(fnc_sample_dir / "images" / f"{name}.png").read_bytes() for name in names]


@pytest.fixture(scope="module")
def served_sample(server, fnc_sample_dir):
    names = sorted(FNC_SAMPLE_COUNTS)
    response = _post(server, build_request(_sample_bytes(fnc_sample_dir, names)))
    assert response.status_code == 200, response.text
    return dict(zip(names, parse_response(response.text)))


def test_served_counts_match_count_job(served_sample, champion_version, fnc_sample_dir, tmp_path):
    counter = load_counter(f"models:/{REGISTERED_MODEL_NAME}/{champion_version}")
    count_folder(fnc_sample_dir / "images", tmp_path, counter, overlays=False)
    counts = pd.read_csv(tmp_path / "counts.csv").set_index("file")

    assert len(served_sample) == 4
    for name, result in served_sample.items():
        assert result["count"] == counts.loc[f"{name}.png", "count"], name
        assert len(result["cells"]) == result["count"], name


def test_served_cells_have_measurements(served_sample):
    cells = [cell for result in served_sample.values() for cell in result["cells"]]

    assert cells, "the served model found no cell in any sample image"
    for cell in cells:
        assert 0 <= cell["centroid_x"] <= 1600
        assert 0 <= cell["centroid_y"] <= 1200
        assert cell["area_px"] > 0
        assert 0.0 <= cell["mean_probability"] <= 1.0


def test_overlay_when_requested(server, fnc_sample_dir, served_sample):
    name = "Mar23bS1C2R3_VLPAGr_200x"
    response = _post(server, build_request(_sample_bytes(fnc_sample_dir, [name]), overlay=True))

    assert response.status_code == 200, response.text
    [result] = parse_response(response.text)
    import cv2

    overlay = cv2.imdecode(np.frombuffer(result["overlay"], np.uint8), cv2.IMREAD_COLOR)
    assert overlay.shape == (1200, 1600, 3)
    assert result["count"] == served_sample[name]["count"]
    assert "overlay" not in served_sample[name] or served_sample[name]["overlay"] is None


def _assert_client_error(response, *phrases):
    assert response.status_code == 400, response.text
    assert "Traceback" not in response.text
    message = response.json()["message"]
    for phrase in phrases:
        assert phrase in message, message
    return message


def test_corrupt_image_rejected(server, fnc_sample_dir):
    truncated = _sample_bytes(fnc_sample_dir, ["Mar24bS1C2R3_LHl_200x"])[0][:2000]

    response = _post(server, build_request([truncated]))

    _assert_client_error(response, "row 0", "cannot be decoded")


def test_text_payload_rejected(server):
    response = _post(server, build_request([b"count these cells, please"]))

    _assert_client_error(response, "not a PNG or TIFF file")


def test_wrong_column_rejected(server, fnc_sample_dir):
    body = build_request(_sample_bytes(fnc_sample_dir, ["Mar24bS1C2R3_LHl_200x"]))
    body["dataframe_split"]["columns"] = ["picture"]

    response = _post(server, body)

    _assert_client_error(response, "missing inputs ['image']")


def test_empty_request_rejected(server):
    response = _post(server, build_request([]))

    _assert_client_error(response, "contains no images")


def test_oversized_image_rejected(server):
    # Random bytes behind a PNG signature: the size check runs before any decoding.
    rng = np.random.default_rng(0)
    oversized = b"\x89PNG\r\n\x1a\n" + rng.bytes(int((MAX_IMAGE_MEGABYTES + 0.5) * 1e6))

    response = _post(server, build_request([oversized]))

    _assert_client_error(response, "row 0", f"over the limit of {MAX_IMAGE_MEGABYTES} MB")


def test_too_many_pixels_rejected(server):
    # 49 megapixels of black compress to about 80 kB but would decode to 147 MB.
    bomb = encode_png(np.zeros((7000, 7000), np.uint8))

    response = _post(server, build_request([bomb]))

    _assert_client_error(response, "7000 x 7000 pixels", "over the limit of 40 megapixels")


def test_invalid_json_rejected(server):
    response = _post(server, "{not json")

    assert response.status_code == 400
    assert "valid JSON" in response.json()["message"]


def test_inputs_format_accepted(server, fnc_sample_dir, served_sample):
    name = "Mar24bS1C2R3_LHl_200x"
    data = base64.b64encode(_sample_bytes(fnc_sample_dir, [name])[0]).decode("ascii")

    response = _post(server, {"inputs": {"image": [data]}})

    assert response.status_code == 200, response.text
    assert parse_response(response.text)[0]["count"] == served_sample[name]["count"]
