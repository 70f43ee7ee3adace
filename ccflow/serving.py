"""Check the requests of a served ccflow model and build them on the client side.

``mlflow models serve`` (MLflow 3.17) has no limit on the request size, so the pyfunc model
checks each request before decoding anything. A request needs at least one image and at
most ``max_images``. Each image may have at most ``max_megabytes`` of encoded data and at
most ``max_megapixels`` pixels as read from the PNG or TIFF header. The pixel check runs before
decoding, so a small file that would decompress into a huge array is rejected cheaply.
The limits come from environment variables of the serving process:

=================================  =======  ==========================================
variable                           default  meaning
=================================  =======  ==========================================
``CCFLOW_MAX_IMAGES_PER_REQUEST``  16       images (rows) per request
``CCFLOW_MAX_IMAGE_MEGABYTES``     64       encoded size of one image, in MB (10^6 B)
``CCFLOW_MAX_IMAGE_MEGAPIXELS``    40       width x height of one image, in millions
=================================  =======  ==========================================

Requests over these limits get HTTP 400 with a message that names the row, the value and
the limit. Larger images are counted with ``ccflow count``, which has no such limits.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

import pandas as pd
import tifffile

from ccflow.errors import CcflowError

IMAGE_COLUMN = "image"
OVERLAY_PARAM = "overlay"

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
# Base64 text of the PNG and TIFF signatures: a client that sends the `inputs` format
# delivers the column as the base64 text itself, because MLflow decodes base64 only for
# the `dataframe_split` and `dataframe_records` formats.
_BASE64_PREFIXES = (b"iVBORw0KGgo", b"SUkqA", b"SUkrA", b"TU0AK")


class RequestError(CcflowError):
    """A request to a served model that cannot be counted; the message explains how to fix it."""


@dataclass(frozen=True)
class RequestLimits:
    """Largest request a served model accepts.

    Attributes
    ----------
    max_images : int
        Rows per request.
    max_megabytes : float
        Encoded size of one image, in megabytes (10^6 bytes).
    max_megapixels : float
        Width times height of one image, in millions of pixels.
    """

    max_images: int = 16
    max_megabytes: float = 64.0
    max_megapixels: float = 40.0

    @classmethod
    def from_environment(cls) -> "RequestLimits":
        """Read the limits from the ``CCFLOW_MAX_*`` variables, with the defaults above."""
        defaults = cls()
        return cls(
            max_images=int(_read_number("CCFLOW_MAX_IMAGES_PER_REQUEST", defaults.max_images)),
            max_megabytes=_read_number("CCFLOW_MAX_IMAGE_MEGABYTES", defaults.max_megabytes),
            max_megapixels=_read_number("CCFLOW_MAX_IMAGE_MEGAPIXELS", defaults.max_megapixels),
        )


def _read_number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return float(default)
    try:
        value = float(text)
    except ValueError as error:
        raise ValueError(f"{name}={text!r} is not a number; set it to a positive number or unset it.") from error
    if value <= 0:
        raise ValueError(f"{name}={text!r} must be positive; set a positive number or unset it.")
    return value


def check_frame(model_input: Any, limits: RequestLimits) -> pd.Series:
    """Return the image column of a request after checking its shape.

    Raises
    ------
    RequestError
        The input is not a table, lacks the ``image`` column, has no rows, or has more
        rows than ``limits.max_images``.
    """
    if not isinstance(model_input, pd.DataFrame):
        raise RequestError(
            f"Expected a table with a column {IMAGE_COLUMN!r}, got {type(model_input).__name__}. "
            'Send {"dataframe_split": {"columns": ["image"], "data": [[<base64 PNG>]]}}.'
        )
    if IMAGE_COLUMN not in model_input.columns:
        raise RequestError(
            f"Missing column {IMAGE_COLUMN!r} in the request; found {list(model_input.columns)}. "
            f"Send each image as base64 PNG or TIFF in a column named {IMAGE_COLUMN!r}."
        )
    rows = len(model_input)
    if rows == 0:
        raise RequestError(
            f"The request contains no images. Send one or more base64 PNG or TIFF images in "
            f"the column {IMAGE_COLUMN!r}."
        )
    if rows > limits.max_images:
        raise RequestError(
            f"The request contains {rows} images; the limit is {limits.max_images} per request "
            "(CCFLOW_MAX_IMAGES_PER_REQUEST). Split the images over several requests."
        )
    return model_input[IMAGE_COLUMN]


def image_bytes(value: Any, position: int, limits: RequestLimits) -> bytes:
    """Return the encoded image of one request row after checking its size.

    Parameters
    ----------
    value : bytes or str
        The cell of the ``image`` column: PNG or TIFF bytes (MLflow has already decoded
        the base64 text for the ``dataframe_*`` formats), or base64 text.
    position : int
        Row number, used in messages.
    limits : RequestLimits
        Size limits.

    Raises
    ------
    RequestError
        The value is not bytes or base64 text, is larger than ``limits.max_megabytes``,
        or its header gives more pixels than ``limits.max_megapixels``.
    """
    data = _as_bytes(value, position)
    megabytes = len(data) / 1e6
    if megabytes > limits.max_megabytes:
        raise RequestError(
            f"row {position}: the image has {megabytes:.1f} MB, over the limit of "
            f"{limits.max_megabytes:g} MB per image (CCFLOW_MAX_IMAGE_MEGABYTES). Send a "
            "smaller image, or count large images with `ccflow count`."
        )
    dimensions = image_dimensions(data)
    if dimensions is not None:
        width, height = dimensions
        megapixels = width * height / 1e6
        if megapixels > limits.max_megapixels:
            raise RequestError(
                f"row {position}: the image is {width} x {height} pixels ({megapixels:.1f} "
                f"megapixels), over the limit of {limits.max_megapixels:g} megapixels "
                "(CCFLOW_MAX_IMAGE_MEGAPIXELS). Send a smaller image, or count large images "
                "with `ccflow count`."
            )
    return data


def _as_bytes(value: Any, position: int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        if data.startswith(_BASE64_PREFIXES):
            return _decode_base64(data, position)
        return data
    if isinstance(value, str):
        return _decode_base64(value.encode("ascii", errors="replace"), position)
    raise RequestError(
        f"row {position}: expected a base64 PNG or TIFF image, got {type(value).__name__} "
        f"{str(value)[:40]!r}."
    )


def _decode_base64(text: bytes, position: int) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as error:
        raise RequestError(
            f"row {position}: the image text is not valid base64 ({error}). Encode the PNG or "
            "TIFF file with standard base64."
        ) from error


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """Read the width and height of a PNG or TIFF from its header, without decoding pixels.

    Returns
    -------
    tuple of (int, int) or None
        ``(width, height)`` of the PNG, or of the first page of the TIFF; None when the
        data is neither format or the header is damaged, which decoding then reports.
    """
    if data.startswith(_PNG_SIGNATURE) and len(data) >= 24 and data[12:16] == b"IHDR":
        width, height = struct.unpack(">II", data[16:24])
        return int(width), int(height)
    if data.startswith(_TIFF_SIGNATURES):
        # Any parsing failure means a damaged header, which decode_image reports in full.
        try:
            with tifffile.TiffFile(BytesIO(data)) as tiff:
                page = tiff.pages.first
                return int(page.imagewidth), int(page.imagelength)
        except Exception:
            return None
    return None


def build_request(images: Sequence[bytes], *, overlay: bool = False) -> dict:
    """Build the JSON body of a ``/invocations`` request for a served ccflow model.

    Parameters
    ----------
    images : sequence of bytes
        Encoded PNG or TIFF files, one row each.
    overlay : bool
        Ask for the overlay with cell outlines and the Grad-CAM heatmap (slower).

    Returns
    -------
    dict
        ``{"dataframe_split": {"columns": ["image"], "data": [[<base64>], ...]},
        "params": {"overlay": overlay}}``, ready for ``json.dumps``.
    """
    rows = [[base64.b64encode(data).decode("ascii")] for data in images]
    return {
        "dataframe_split": {"columns": [IMAGE_COLUMN], "data": rows},
        "params": {OVERLAY_PARAM: bool(overlay)},
    }


def parse_response(body: str | bytes) -> list[dict]:
    """Turn the JSON body of a ``/invocations`` response into one dict per image.

    Each dict has ``count`` (int), ``mean_probability`` (float), ``cells`` (list of dicts
    with ``cell_id``, ``centroid_x``, ``centroid_y``, ``area_px``,
    ``equivalent_diameter_px`` and ``mean_probability``, in original pixels) and, when
    requested, ``overlay`` (PNG bytes).
    """
    rows = json.loads(body)["predictions"]
    results = []
    for row in rows:
        result = dict(row)
        result["cells"] = json.loads(row["cells"])
        if row.get("overlay"):
            result["overlay"] = base64.b64decode(row["overlay"])
        results.append(result)
    return results
