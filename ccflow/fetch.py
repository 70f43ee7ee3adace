"""Download the Fluorescent Neuronal Cells v2 archive and lay it out for ccflow.

The archive (Clissa et al., Scientific Data 2024, doi:10.6092/unibo/amsacta/7347,
CC BY 4.0) holds one zip per collection. Inside, ``trainval/`` and ``test/`` each
contain ``images/`` and ``ground_truths/masks/``. :func:`fetch_fnc` writes them as

    DEST/trainval/images/, DEST/trainval/masks/
    DEST/test/images/,     DEST/test/masks/

so that ``ccflow train --data DEST/trainval --test-data DEST/test`` reads them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from ccflow.errors import CcflowError

logger = logging.getLogger(__name__)

COLLECTIONS: dict[str, tuple[str, str]] = {
    "yellow": (
        "https://amsacta.unibo.it/id/eprint/7347/27/yellow.zip",
        "08048f5c71d4afa726cc54fd887a06cc6894aff62f6704ff5a8c15aa2f9946ca",
    ),
    "green": (
        "https://amsacta.unibo.it/id/eprint/7347/28/green.zip",
        "7760c3c55d236c17f2225a0a63e8e61a86c93d0645c7188bbe9652f22f520517",
    ),
    "red": (
        "https://amsacta.unibo.it/id/eprint/7347/29/red.zip",
        "0a9a2ac9dbdd7222cadf44a7846f61f9d0adb08cf09b801efb917a76e8704533",
    ),
}
"""Download URL and sha256 of each collection's zip, from the AMS Acta record."""

SPLITS = ("trainval", "test")
DOWNLOAD_FOLDER = ".download"
MARKER_FILE = ".ccflow-fetch.json"
CHUNK_BYTES = 1 << 20


class ChecksumError(CcflowError):
    """A downloaded archive does not have the expected sha256 checksum."""


class DownloadError(CcflowError):
    """A download failed or the server sent an unusable response."""


@dataclass
class FetchResult:
    """Output folders of the trainval and test splits, and the image-mask pairs in each."""

    dest: Path
    pairs: dict[str, int]
    skipped: dict[str, list[str]]


def fetch_fnc(
    collection: str,
    dest: Path,
    *,
    url: str | None = None,
    sha256: str | None = None,
    timeout_s: float = 60.0,
    keep_archive: bool = False,
) -> FetchResult:
    """Download, verify, unpack and lay out one collection of the FNC v2 archive.

    Parameters
    ----------
    collection : {"yellow", "green", "red"}
        Collection to fetch.
    dest : Path
        Output folder; ``trainval/`` and ``test/`` are created inside it.
    url, sha256 : str, optional
        Replace the published URL and checksum, for a mirror or a local copy.
    timeout_s : float
        Seconds to wait for the server on connect and on each read.
    keep_archive : bool
        Keep the verified zip in ``dest/.download/`` after unpacking.

    Returns
    -------
    FetchResult

    Raises
    ------
    ValueError
        Unknown collection.
    DownloadError
        The server could not be reached or returned an error status.
    ChecksumError
        The downloaded file is not the expected archive; it is deleted.

    Notes
    -----
    An interrupted download leaves ``dest/.download/<name>.part``; the next call
    continues it with an HTTP Range request. A server that ignores Range sends the
    whole file again, which replaces the partial one. Images without a mask and masks
    without an image are skipped and listed in the result.
    """
    if collection not in COLLECTIONS:
        raise ValueError(f"Unknown collection {collection!r}: choose one of {', '.join(COLLECTIONS)}.")
    default_url, default_sha = COLLECTIONS[collection]
    url, sha256 = url or default_url, (sha256 or default_sha).lower()
    dest = Path(dest)

    marker = dest / MARKER_FILE
    if marker.is_file() and json.loads(marker.read_text()).get("sha256") == sha256:
        logger.info("%s already contains the %s collection; nothing to do", dest, collection)
        return FetchResult(dest, json.loads(marker.read_text())["pairs"], {})

    downloads = dest / DOWNLOAD_FOLDER
    downloads.mkdir(parents=True, exist_ok=True)
    archive = downloads / (Path(urllib.request.urlparse(url).path).name or f"{collection}.zip")
    if not (archive.is_file() and file_sha256(archive) == sha256):
        download(url, archive, timeout_s=timeout_s)
        verify_sha256(archive, sha256)

    with tempfile.TemporaryDirectory(prefix="ccflow-unpack-", dir=downloads) as scratch:
        logger.info("Unpacking %s", archive)
        _unpack(archive, Path(scratch))
        result = _lay_out(Path(scratch), dest)

    if not keep_archive:
        archive.unlink()
    marker.write_text(json.dumps({"collection": collection, "url": url, "sha256": sha256, "pairs": result.pairs}))
    logger.info("Wrote %s to %s: %s image-mask pairs", collection, dest, result.pairs)
    return result


def download(url: str, target: Path, *, timeout_s: float = 60.0) -> Path:
    """Download ``url`` to ``target``, continuing ``target.part`` if a previous call left one."""
    part = target.with_name(target.name + ".part")
    offset = part.stat().st_size if part.is_file() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        if error.code == 416 and offset:
            # The partial file already has every byte the server offers.
            part.replace(target)
            return target
        raise DownloadError(f"Download of {url} failed: HTTP {error.code} {error.reason}.") from error
    except (urllib.error.URLError, OSError) as error:
        raise DownloadError(
            f"Download of {url} failed: {error}. Check the network, or pass --url for a mirror."
        ) from error

    with response:
        if offset and response.status != 206:
            logger.info("The server ignored the Range request; downloading %s from the start", url)
            offset = 0
        elif offset:
            logger.info("Continuing the download of %s at byte %d", url, offset)
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None else None
        mode = "ab" if offset else "wb"
        with open(part, mode) as out, tqdm(
            total=total, initial=offset, unit="B", unit_scale=True, desc=target.name
        ) as bar:
            while chunk := response.read(CHUNK_BYTES):
                out.write(chunk)
                bar.update(len(chunk))
    if total is not None and part.stat().st_size != total:
        raise DownloadError(
            f"Download of {url} stopped at {part.stat().st_size} of {total} bytes; "
            "run the command again to continue it."
        )
    part.replace(target)
    return target


def file_sha256(path: Path) -> str:
    """Return the hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str) -> None:
    """Raise ChecksumError, after deleting the file, when its sha256 differs from ``expected``."""
    actual = file_sha256(path)
    if actual != expected.lower():
        path.unlink()
        raise ChecksumError(
            f"Checksum mismatch for {path.name}: expected sha256 {expected}, got {actual}. "
            "The file was deleted; run the command again, or check --url and --sha256."
        )
    logger.info("Checksum of %s verified", path.name)


def _unpack(archive: Path, folder: Path) -> None:
    try:
        if archive.suffix == ".zip":
            shutil.unpack_archive(archive, folder)
        else:
            # The "data" filter rejects absolute paths and links that leave the folder.
            shutil.unpack_archive(archive, folder, filter="data")
    except (shutil.ReadError, ValueError, OSError) as error:
        raise DownloadError(f"Cannot unpack {archive}: {error}. Delete it and download it again.") from error


def _find_split(root: Path, split: str) -> Path:
    """Return the shallowest ``split`` folder that has an ``images/`` folder."""
    candidates = sorted(
        (p for p in root.rglob(split) if p.is_dir() and (p / "images").is_dir()),
        key=lambda p: len(p.parts),
    )
    if not candidates:
        raise DownloadError(
            f"The archive has no {split}/images folder; is it a Fluorescent Neuronal Cells v2 collection?"
        )
    return candidates[0]


def _lay_out(root: Path, dest: Path) -> FetchResult:
    pairs, skipped = {}, {}
    for split in SPLITS:
        source = _find_split(root, split)
        mask_folder = source / "ground_truths" / "masks"
        images = {p.stem: p for p in (source / "images").iterdir() if p.is_file()}
        masks = {p.stem: p for p in mask_folder.iterdir() if p.is_file()} if mask_folder.is_dir() else {}
        unpaired = sorted(set(images) ^ set(masks))
        if unpaired:
            logger.warning("%s: skipping %d files without a partner: %s", split, len(unpaired), unpaired[:10])
        out_images, out_masks = dest / split / "images", dest / split / "masks"
        out_images.mkdir(parents=True, exist_ok=True)
        out_masks.mkdir(parents=True, exist_ok=True)
        for stem in sorted(set(images) & set(masks)):
            shutil.move(images[stem], out_images / images[stem].name)
            shutil.move(masks[stem], out_masks / masks[stem].name)
        pairs[split] = len(set(images) & set(masks))
        skipped[split] = unpaired
    return FetchResult(dest, pairs, skipped)
