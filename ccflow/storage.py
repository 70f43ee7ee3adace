"""List, read and write objects in local folders, Google Cloud Storage and Amazon S3.

A location is a local path, ``gs://bucket/prefix`` or ``s3://bucket/prefix``. Clients are
configured the standard way:

- GCS through google-cloud-storage with application default credentials
  (``GOOGLE_APPLICATION_CREDENTIALS`` or ``gcloud auth application-default login``);
  ``STORAGE_EMULATOR_HOST`` or :attr:`StorageOptions.gcs_endpoint` selects an emulator,
  which is used without credentials.
- S3 through boto3 with the usual chain (``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID`` and
  friends, instance roles); ``AWS_ENDPOINT_URL`` or :attr:`StorageOptions.s3_endpoint_url`
  selects an S3-compatible store such as MinIO.

Transient errors (throttling, 5xx responses, dropped connections) are retried with
exponential backoff and logged. A missing bucket, missing or rejected credentials and
permission errors raise :class:`StorageError` subclasses at once, with what to do.
"""

from __future__ import annotations

import logging
import os
import random
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar

from ccflow.errors import CcflowError

logger = logging.getLogger(__name__)

Scheme = Literal["file", "gs", "s3"]
T = TypeVar("T")

# Environment variables that configure the storage clients. The batch job copies those set
# on the driver to its Ray tasks, which may run in processes started before they were set.
STORAGE_ENV_VARS = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_REGION",
    "AWS_REGION",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_EC2_METADATA_DISABLED",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT",
    "GCE_METADATA_HOST",
    "NO_GCE_CHECK",
)

RETRY_ATTEMPTS = 5
RETRY_BASE_SECONDS = 0.5
RETRY_MAX_SECONDS = 8.0


class StorageError(CcflowError):
    """A storage location cannot be used at all; the job must stop."""


class BucketNotFoundError(StorageError):
    """The bucket (or local folder) does not exist."""


class StorageCredentialsError(StorageError):
    """No credentials were found, or the store rejected them."""


class StoragePermissionError(StorageError):
    """The credentials lack a permission the job needs."""


class ObjectReadError(CcflowError):
    """One object cannot be read; the job records it and goes on."""


class TransientStorageError(CcflowError):
    """A storage call failed in a way that a later attempt may not."""


@dataclass(frozen=True)
class StorageOptions:
    """Endpoints and environment of the storage clients, shipped to every Ray task.

    Attributes
    ----------
    s3_endpoint_url : str or None
        Endpoint of an S3-compatible store, such as ``http://127.0.0.1:9000``. None uses
        ``AWS_ENDPOINT_URL`` when set, else AWS.
    gcs_endpoint : str or None
        Endpoint of a GCS emulator, such as ``http://127.0.0.1:9023``; used without
        credentials. None uses ``STORAGE_EMULATOR_HOST`` when set, else Google Cloud.
    environment : mapping of str to str
        Storage variables of :data:`STORAGE_ENV_VARS` to set in a worker process where
        they are unset.
    """

    s3_endpoint_url: str | None = None
    gcs_endpoint: str | None = None
    environment: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_environment(cls, s3_endpoint_url: str | None = None) -> "StorageOptions":
        """Capture the endpoints and storage variables of the current process."""
        return cls(
            s3_endpoint_url=s3_endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None,
            gcs_endpoint=_with_scheme(os.environ.get("STORAGE_EMULATOR_HOST")),
            environment={name: os.environ[name] for name in STORAGE_ENV_VARS if name in os.environ},
        )

    def apply_environment(self) -> None:
        """Set the captured variables that this process does not set itself."""
        for name, value in self.environment.items():
            os.environ.setdefault(name, value)


@dataclass(frozen=True)
class Location:
    """A folder, or a bucket and key prefix, parsed from a path or URI."""

    scheme: Scheme
    bucket: str
    prefix: str

    @classmethod
    def parse(cls, uri: str | Path) -> "Location":
        """Parse ``gs://bucket/prefix``, ``s3://bucket/prefix`` or a local path."""
        text = str(uri)
        for scheme in ("gs", "s3"):
            if text.startswith(f"{scheme}://"):
                bucket, _, prefix = text[len(scheme) + 3 :].partition("/")
                if not bucket:
                    raise ValueError(f"Invalid location {text!r}: no bucket name after {scheme}://.")
                return cls(scheme, bucket, prefix.strip("/"))
        if "://" in text:
            raise ValueError(
                f"Unsupported location {text!r}: use a local path, gs://bucket/prefix or s3://bucket/prefix."
            )
        return cls("file", "", str(Path(text).expanduser().resolve()))

    def key(self, name: str) -> str:
        """Return the full object key (or file path) of ``name`` under the prefix."""
        if self.scheme == "file":
            return str(Path(self.prefix) / name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def __str__(self) -> str:
        if self.scheme == "file":
            return self.prefix
        return f"{self.scheme}://{self.bucket}/{self.prefix}".rstrip("/")


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object.

    Attributes
    ----------
    name : str
        Key relative to the listed prefix, with ``/`` separators.
    size : int
        Bytes.
    fingerprint : str
        Changes when the content changes: the MD5 hash on GCS, the ETag on S3, and the
        size with the modification time in nanoseconds for local files.
    """

    name: str
    size: int
    fingerprint: str


class Storage(ABC):
    """Objects under one location; names are relative to its prefix."""

    def __init__(self, location: Location) -> None:
        self.location = location

    @abstractmethod
    def check(self, *, write: bool = False) -> None:
        """Raise a :class:`StorageError` when the location cannot be listed, or a local output folder created.

        NOTE: write permission on a bucket is first tested by the first upload.
        """

    @abstractmethod
    def list(self, suffixes: tuple[str, ...]) -> Iterator[ObjectInfo]:
        """Yield the objects whose name ends in one of ``suffixes`` (case-insensitive)."""

    @abstractmethod
    def read_bytes(self, name: str) -> bytes:
        """Return the content of one object; :class:`ObjectReadError` when it is missing."""

    @abstractmethod
    def write_bytes(self, name: str, data: bytes) -> None:
        """Create or replace one object."""

    @abstractmethod
    def download(self, name: str, destination: Path) -> bool:
        """Copy one object to a local file; return False when the object does not exist."""

    @abstractmethod
    def upload(self, source: Path, name: str) -> None:
        """Create or replace one object with the content of a local file."""


class LocalStorage(Storage):
    """A local folder, searched recursively."""

    @property
    def root(self) -> Path:
        return Path(self.location.prefix)

    def check(self, *, write: bool = False) -> None:
        if write:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise StoragePermissionError(
                    f"Cannot create the output folder {self.root}: {error}. Choose a writable folder."
                ) from error
        elif not self.root.is_dir():
            raise BucketNotFoundError(f"Input folder not found: {self.root}. Pass a folder of images.")

    def list(self, suffixes: tuple[str, ...]) -> Iterator[ObjectInfo]:
        for directory, subdirectories, files in os.walk(self.root):
            subdirectories.sort()
            for file_name in sorted(files):
                if not file_name.lower().endswith(suffixes):
                    continue
                path = Path(directory) / file_name
                stat = path.stat()
                yield ObjectInfo(
                    name=path.relative_to(self.root).as_posix(),
                    size=stat.st_size,
                    fingerprint=f"{stat.st_size}-{stat.st_mtime_ns}",
                )

    def read_bytes(self, name: str) -> bytes:
        try:
            return (self.root / name).read_bytes()
        except OSError as error:
            raise ObjectReadError(f"{name}: cannot read {self.root / name}: {error}") from error

    def write_bytes(self, name: str, data: bytes) -> None:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def download(self, name: str, destination: Path) -> bool:
        source = self.root / name
        if not source.is_file():
            return False
        if source.resolve() != Path(destination).resolve():
            Path(destination).write_bytes(source.read_bytes())
        return True

    def upload(self, source: Path, name: str) -> None:
        target = self.root / name
        if Path(source).resolve() != target.resolve():
            self.write_bytes(name, Path(source).read_bytes())


class GCSStorage(Storage):
    """A Google Cloud Storage bucket and prefix."""

    def __init__(self, location: Location, options: StorageOptions) -> None:
        super().__init__(location)
        from google.cloud import storage

        if options.gcs_endpoint:
            from google.auth.credentials import AnonymousCredentials

            client = storage.Client(
                project=os.environ.get("GOOGLE_CLOUD_PROJECT", "ccflow"),
                credentials=AnonymousCredentials(),
                client_options={"api_endpoint": options.gcs_endpoint},
            )
        else:
            client = _call_gcs(storage.Client, location, "create a client")
        self.client = client
        self.bucket = client.bucket(location.bucket)

    def check(self, *, write: bool = False) -> None:
        # Listing one object checks the bucket, the credentials and the list permission.
        _call_gcs(lambda: list(self.client.list_blobs(self.bucket, prefix=self.location.prefix, max_results=1, retry=None)),
                  self.location, "list")

    def list(self, suffixes: tuple[str, ...]) -> Iterator[ObjectInfo]:
        prefix = f"{self.location.prefix}/" if self.location.prefix else ""
        pages = self.client.list_blobs(self.bucket, prefix=prefix, retry=None).pages
        while True:
            page = _call_gcs(lambda: next(pages, None), self.location, "list")
            if page is None:
                return
            for blob in page:
                if blob.name.lower().endswith(suffixes):
                    yield ObjectInfo(
                        name=blob.name[len(prefix) :],
                        size=int(blob.size or 0),
                        fingerprint=blob.md5_hash or blob.etag or str(blob.generation),
                    )

    def read_bytes(self, name: str) -> bytes:
        from google.api_core.exceptions import NotFound

        blob = self.bucket.blob(self.location.key(name))
        try:
            return _call_gcs(lambda: blob.download_as_bytes(retry=None), self.location, f"read {name}")
        except NotFound as error:
            raise ObjectReadError(f"{name}: object not found in {self.location}") from error

    def write_bytes(self, name: str, data: bytes) -> None:
        blob = self.bucket.blob(self.location.key(name))
        _call_gcs(lambda: blob.upload_from_string(data, retry=None), self.location, f"write {name}")

    def download(self, name: str, destination: Path) -> bool:
        from google.api_core.exceptions import NotFound

        blob = self.bucket.blob(self.location.key(name))
        try:
            data = _call_gcs(lambda: blob.download_as_bytes(retry=None), self.location, f"read {name}")
        except NotFound:
            return False
        Path(destination).write_bytes(data)
        return True

    def upload(self, source: Path, name: str) -> None:
        blob = self.bucket.blob(self.location.key(name))
        _call_gcs(lambda: blob.upload_from_filename(str(source), retry=None), self.location, f"write {name}")


class S3Storage(Storage):
    """An Amazon S3 (or S3-compatible) bucket and prefix."""

    def __init__(self, location: Location, options: StorageOptions) -> None:
        super().__init__(location)
        import boto3
        from botocore.config import Config

        # One attempt per call: the retries of this module are the only ones, so that
        # each is logged and the backoff is the same for both clouds.
        config = Config(retries={"total_max_attempts": 1, "mode": "standard"})
        # A session of its own reads the credential chain now: boto3's shared default
        # session keeps whatever credentials it resolved first in this process.
        session = boto3.session.Session()
        self.client = session.client("s3", endpoint_url=options.s3_endpoint_url, config=config)

    def check(self, *, write: bool = False) -> None:
        _call_s3(
            lambda: self.client.list_objects_v2(
                Bucket=self.location.bucket, Prefix=self.location.prefix, MaxKeys=1
            ),
            self.location,
            "list",
        )

    def list(self, suffixes: tuple[str, ...]) -> Iterator[ObjectInfo]:
        prefix = f"{self.location.prefix}/" if self.location.prefix else ""
        token = None
        while True:
            arguments = {"Bucket": self.location.bucket, "Prefix": prefix}
            if token:
                arguments["ContinuationToken"] = token
            page = _call_s3(lambda: self.client.list_objects_v2(**arguments), self.location, "list")
            for item in page.get("Contents", []):
                if item["Key"].lower().endswith(suffixes):
                    yield ObjectInfo(
                        name=item["Key"][len(prefix) :],
                        size=int(item["Size"]),
                        fingerprint=item["ETag"].strip('"'),
                    )
            if not page.get("IsTruncated"):
                return
            token = page["NextContinuationToken"]

    def read_bytes(self, name: str) -> bytes:
        key = self.location.key(name)
        try:
            response = _call_s3(
                lambda: self.client.get_object(Bucket=self.location.bucket, Key=key),
                self.location,
                f"read {name}",
                missing_object_ok=True,
            )
            return response["Body"].read()
        except _MissingObject as error:
            raise ObjectReadError(f"{name}: object not found in {self.location}") from error

    def write_bytes(self, name: str, data: bytes) -> None:
        key = self.location.key(name)
        _call_s3(
            lambda: self.client.put_object(Bucket=self.location.bucket, Key=key, Body=data),
            self.location,
            f"write {name}",
        )

    def download(self, name: str, destination: Path) -> bool:
        try:
            data = self.read_bytes(name)
        except ObjectReadError:
            return False
        Path(destination).write_bytes(data)
        return True

    def upload(self, source: Path, name: str) -> None:
        self.write_bytes(name, Path(source).read_bytes())


def open_storage(uri: str | Path | Location, options: StorageOptions | None = None) -> Storage:
    """Return the :class:`Storage` of a local path, ``gs://`` or ``s3://`` URI."""
    location = uri if isinstance(uri, Location) else Location.parse(uri)
    options = options or StorageOptions.from_environment()
    if location.scheme == "gs":
        return GCSStorage(location, options)
    if location.scheme == "s3":
        return S3Storage(location, options)
    return LocalStorage(location)


def retry_transient(call: Callable[[], T], what: str) -> T:
    """Run ``call``; on :class:`TransientStorageError` wait and retry, up to RETRY_ATTEMPTS.

    The wait doubles from RETRY_BASE_SECONDS up to RETRY_MAX_SECONDS, with random jitter
    of up to half the wait so that parallel tasks do not retry in step.
    """
    for attempt in range(1, RETRY_ATTEMPTS + 1):
        try:
            return call()
        except TransientStorageError as error:
            if attempt == RETRY_ATTEMPTS:
                raise StorageError(
                    f"{what} failed after {RETRY_ATTEMPTS} attempts: {error}. "
                    "Check the network and the storage service status, then run the job again."
                ) from error
            wait = min(RETRY_MAX_SECONDS, RETRY_BASE_SECONDS * 2 ** (attempt - 1))
            wait += random.uniform(0, wait / 2)
            logger.warning("%s failed (attempt %d of %d): %s; retrying in %.1f s",
                           what, attempt, RETRY_ATTEMPTS, error, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------
# Error translation
# --------------------------------------------------------------------------------------


class _MissingObject(Exception):
    pass


_GCS_TRANSIENT_CODES = {408, 429, 500, 502, 503, 504}
_S3_TRANSIENT_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "RequestTimeTooSkewed",
    "InternalError", "ServiceUnavailable", "503", "500", "502", "504",
}
_S3_CREDENTIAL_CODES = {
    "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "TokenRefreshRequired",
}


def _call_gcs(call: Callable[[], T], location: Location, action: str) -> T:
    return retry_transient(lambda: _translate_gcs(call, location, action), f"{action} {location}")


def _translate_gcs(call: Callable[[], T], location: Location, action: str) -> T:
    import requests
    from google.api_core import exceptions as gexc
    from google.auth.exceptions import DefaultCredentialsError, RefreshError, TransportError

    try:
        return call()
    except DefaultCredentialsError as error:
        raise StorageCredentialsError(
            f"No Google Cloud credentials found for {location}: {error}. Run "
            "`gcloud auth application-default login` or set GOOGLE_APPLICATION_CREDENTIALS "
            "to a service account key file."
        ) from error
    except RefreshError as error:
        raise StorageCredentialsError(
            f"Google Cloud rejected the credentials for {location}: {error}. Log in again or "
            "replace the key in GOOGLE_APPLICATION_CREDENTIALS."
        ) from error
    except gexc.Unauthorized as error:
        raise StorageCredentialsError(
            f"Google Cloud rejected the credentials for {location} (401): {error.message}"
        ) from error
    except gexc.Forbidden as error:
        raise StoragePermissionError(
            f"Permission denied to {action} in {location}: {error.message}. Grant the account "
            "roles/storage.objectViewer on input buckets and roles/storage.objectAdmin on the "
            "output bucket."
        ) from error
    except gexc.NotFound as error:
        if "bucket" in (error.message or "").lower() or action == "list":
            raise BucketNotFoundError(
                f"Bucket gs://{location.bucket} not found. Check the name and the project, "
                "or create the bucket first."
            ) from error
        raise
    except gexc.GoogleAPICallError as error:
        if error.code in _GCS_TRANSIENT_CODES:
            raise TransientStorageError(f"{error.code} {error.message}") from error
        raise
    except (requests.ConnectionError, requests.Timeout, TransportError, ConnectionError) as error:
        raise TransientStorageError(f"{type(error).__name__}: {error}") from error


def _call_s3(
    call: Callable[[], T], location: Location, action: str, *, missing_object_ok: bool = False
) -> T:
    return retry_transient(
        lambda: _translate_s3(call, location, action, missing_object_ok), f"{action} {location}"
    )


def _translate_s3(call: Callable[[], T], location: Location, action: str, missing_object_ok: bool) -> T:
    from botocore import exceptions as bexc

    try:
        return call()
    except bexc.NoCredentialsError as error:
        raise StorageCredentialsError(
            f"No AWS credentials found for {location}. Set AWS_PROFILE, or AWS_ACCESS_KEY_ID "
            "and AWS_SECRET_ACCESS_KEY, or run on a machine with an instance role."
        ) from error
    except bexc.ClientError as error:
        code = str(error.response.get("Error", {}).get("Code", ""))
        message = error.response.get("Error", {}).get("Message", "") or str(error)
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket":
            raise BucketNotFoundError(
                f"Bucket s3://{location.bucket} not found. Check the name, the region and "
                "the endpoint (--s3-endpoint-url or AWS_ENDPOINT_URL), or create the bucket first."
            ) from error
        if code in ("NoSuchKey", "404") and missing_object_ok:
            raise _MissingObject(code) from error
        if code in _S3_CREDENTIAL_CODES:
            raise StorageCredentialsError(
                f"AWS rejected the credentials for {location} ({code}): {message}. Check "
                "AWS_PROFILE or the access keys, and renew expired session tokens."
            ) from error
        if code in ("AccessDenied", "AllAccessDisabled", "403") or status == 403:
            raise StoragePermissionError(
                f"Permission denied to {action} in {location} ({code}): {message}. Grant "
                "s3:ListBucket and s3:GetObject on input buckets and s3:PutObject on the output bucket."
            ) from error
        if code in _S3_TRANSIENT_CODES or (status is not None and status >= 500):
            raise TransientStorageError(f"{code}: {message}") from error
        raise
    except (
        bexc.EndpointConnectionError,
        bexc.ConnectionClosedError,
        bexc.ReadTimeoutError,
        bexc.ConnectTimeoutError,
    ) as error:
        raise TransientStorageError(f"{type(error).__name__}: {error}") from error


def _with_scheme(host: str | None) -> str | None:
    if not host:
        return None
    return host if "://" in host else f"http://{host}"
