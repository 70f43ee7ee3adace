"""fetch-fnc against a small archive of the FNC layout served over HTTP on 127.0.0.1."""

import hashlib
import http.server
import threading
import zipfile

import pytest

from ccflow.data import list_samples
from ccflow.fetch import ChecksumError, fetch_fnc

pytestmark = pytest.mark.timeout(120)


def _build_archive(sample_dir, path):
    """Zip the four sample pairs as yellow/trainval (3) and yellow/test (1), with extra folders."""
    images = sorted((sample_dir / "images").glob("*.png"))
    with zipfile.ZipFile(path, "w") as archive:
        for index, image in enumerate(images):
            split = "test" if index == 0 else "trainval"
            archive.write(image, f"yellow/{split}/images/{image.name}")
            archive.write(sample_dir / "masks" / image.name, f"yellow/{split}/ground_truths/masks/{image.name}")
            archive.writestr(f"yellow/{split}/ground_truths/rle/{image.stem}.txt", "unused")
        archive.writestr("yellow/unlabelled/images/extra.png", b"not read")
    return path.read_bytes()


class _RangeHandler(http.server.BaseHTTPRequestHandler):
    payload = b""
    range_headers: list = []

    def do_GET(self):  # noqa: N802 - the name http.server dispatches to
        start = 0
        header = self.headers.get("Range")
        type(self).range_headers.append(header)
        if header:
            start = int(header.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(self.payload) - 1}/{len(self.payload)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(self.payload) - start))
        self.end_headers()
        self.wfile.write(self.payload[start:])

    def log_message(self, *args):
        pass


@pytest.fixture()
def archive_server(fnc_sample_dir, tmp_path):
    payload = _build_archive(fnc_sample_dir, tmp_path / "yellow.zip")
    handler = type("Handler", (_RangeHandler,), {"payload": payload, "range_headers": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/yellow.zip", payload, handler
    server.shutdown()
    server.server_close()


def test_fetch_lays_out_splits(archive_server, tmp_path):
    url, payload, _ = archive_server
    dest = tmp_path / "fnc"

    result = fetch_fnc("yellow", dest, url=url, sha256=hashlib.sha256(payload).hexdigest())

    assert result.pairs == {"trainval": 3, "test": 1}
    assert len(list_samples(dest / "trainval", require_masks=True)) == 3
    assert len(list_samples(dest / "test", require_masks=True)) == 1
    assert not (dest / ".download" / "yellow.zip").exists()


def test_fetch_resumes_partial_download(archive_server, tmp_path):
    url, payload, handler = archive_server
    dest = tmp_path / "fnc"
    half = len(payload) // 2
    (dest / ".download").mkdir(parents=True)
    (dest / ".download" / "yellow.zip.part").write_bytes(payload[:half])

    result = fetch_fnc("yellow", dest, url=url, sha256=hashlib.sha256(payload).hexdigest())

    assert handler.range_headers == [f"bytes={half}-"]
    assert result.pairs["trainval"] == 3


def test_fetch_rejects_bad_checksum(archive_server, tmp_path):
    url, _, _ = archive_server
    dest = tmp_path / "fnc"

    with pytest.raises(ChecksumError, match="expected sha256 0000"):
        fetch_fnc("yellow", dest, url=url, sha256="0" * 64)
    assert not (dest / ".download" / "yellow.zip").exists()
    assert not (dest / "trainval").exists()


def test_fetch_rejects_unknown_collection(tmp_path):
    with pytest.raises(ValueError, match="Unknown collection 'blue'"):
        fetch_fnc("blue", tmp_path)
