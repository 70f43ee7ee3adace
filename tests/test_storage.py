"""Storage locations, local listing, retries and credential errors, without Ray or a model."""

import logging
import os

import pytest

from ccflow import storage
from ccflow.batch import _excluded_prefix
from ccflow.storage import (
    Location,
    ObjectReadError,
    S3Storage,
    StorageCredentialsError,
    StorageError,
    StorageOptions,
    TransientStorageError,
    open_storage,
    retry_transient,
)


@pytest.mark.parametrize(
    "uri, scheme, bucket, prefix",
    [
        ("gs://lab/plate1/", "gs", "lab", "plate1"),
        ("s3://lab", "s3", "lab", ""),
        ("s3://lab/a/b", "s3", "lab", "a/b"),
    ],
)
def test_location_parses_bucket_uris(uri, scheme, bucket, prefix):
    location = Location.parse(uri)

    assert location.scheme == scheme
    assert location.bucket == bucket
    assert location.prefix == prefix


def test_location_rejects_other_schemes():
    with pytest.raises(ValueError, match="Unsupported location"):
        Location.parse("azure://container/x")
    with pytest.raises(ValueError, match="no bucket name"):
        Location.parse("gs:///x")


def test_local_listing_is_recursive(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "one.PNG").write_bytes(b"1")
    (tmp_path / "two.tif").write_bytes(b"22")
    (tmp_path / "notes.txt").write_bytes(b"x")
    local = open_storage(tmp_path)

    listed = {info.name: info for info in local.list((".png", ".tif", ".tiff"))}

    assert sorted(listed) == ["a/one.PNG", "two.tif"]
    assert listed["two.tif"].size == 2


def test_local_fingerprint_changes_with_content(tmp_path):
    image = tmp_path / "one.png"
    image.write_bytes(b"1")
    before = next(open_storage(tmp_path).list((".png",))).fingerprint
    image.write_bytes(b"22")
    os.utime(image, ns=(1, 1))

    after = next(open_storage(tmp_path).list((".png",))).fingerprint

    assert before != after


def test_local_missing_object_is_read_error(tmp_path):
    with pytest.raises(ObjectReadError, match="absent.png"):
        open_storage(tmp_path).read_bytes("absent.png")


def test_retry_succeeds_after_transient_errors(monkeypatch, caplog):
    monkeypatch.setattr(storage, "RETRY_BASE_SECONDS", 0.0)
    attempts = []

    def flaky():
        attempts.append(1)
        if len(attempts) < 3:
            raise TransientStorageError("503 Service Unavailable")
        return "data"

    with caplog.at_level(logging.WARNING, logger="ccflow.storage"):
        assert retry_transient(flaky, "read x") == "data"
    assert len(attempts) == 3
    assert sum("retrying" in message for message in caplog.messages) == 2


def test_retry_gives_up_with_storage_error(monkeypatch):
    monkeypatch.setattr(storage, "RETRY_BASE_SECONDS", 0.0)

    def down():
        raise TransientStorageError("503 Service Unavailable")

    with pytest.raises(StorageError, match="after 5 attempts"):
        retry_transient(down, "read x")


def test_s3_without_credentials_fails_clearly(tmp_path, monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "absent-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "absent-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", raising=False)
    monkeypatch.delenv("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", raising=False)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    # Nothing listens on this port; the credential error comes before any request.
    s3 = S3Storage(Location.parse("s3://lab/x"), StorageOptions(s3_endpoint_url="http://127.0.0.1:9"))

    with pytest.raises(StorageCredentialsError, match="No AWS credentials"):
        s3.check()


@pytest.mark.parametrize(
    "input_uri, output_uri, expected",
    [
        ("s3://lab/in", "s3://lab/in/results", "results/"),
        ("s3://lab/in", "s3://lab/out", None),
        ("s3://lab/in", "gs://lab/in/results", None),
        ("s3://lab", "s3://lab/results", "results/"),
    ],
)
def test_output_inside_input_is_excluded(input_uri, output_uri, expected):
    assert _excluded_prefix(Location.parse(input_uri), Location.parse(output_uri)) == expected


def test_local_output_inside_input_is_excluded(tmp_path):
    excluded = _excluded_prefix(Location.parse(tmp_path), Location.parse(tmp_path / "out"))

    assert excluded == "out/"
