"""Read images and masks, list and split datasets, and serve training crops.

Conventions: raw images are numpy arrays of shape (H, W, 3), channels-last, dtype uint8 or
uint16. Float images are float32 (H, W, 3) in [0, 1]. Masks are bool (H, W) with True for
cell pixels, and each cell is one 8-connected component.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import cv2
import numpy as np
import tifffile
import torch
from scipy import ndimage

from ccflow.errors import DatasetError, ImageReadError

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".tif", ".tiff")

NETWORK_INPUT_MULTIPLE = 32
"""Network crop sides are rounded up to this multiple, which smp encoders of depth 5 need."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)

# Extra context taken around a training crop before augmentation, relative to the crop
# side, so that zooming out and rotating mostly show real image content instead of padding.
_AUGMENT_CONTEXT = 1.5


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def decode_image(data: bytes, name: str) -> np.ndarray:
    """Decode PNG or TIFF bytes into a raw RGB image.

    Parameters
    ----------
    data : bytes
        Content of a PNG or TIFF file. The format is detected from the file signature,
        not from ``name``.
    name : str
        File name or path, used only in messages.

    Returns
    -------
    numpy.ndarray
        Raw image of shape (H, W, 3), dtype uint8 or uint16 as stored. Single-channel
        images are replicated to three channels, an alpha channel is dropped, TIFFs stored
        channels-first (C, H, W with C in 1, 3, 4) are transposed to channels-last, and
        1-bit images become uint8 with values 0 and 255. Of a multi-page TIFF only the first
        page is read, with a ``UserWarning``. The one exception is an ImageJ hyperstack
        whose first axis is 3 or 4 channels: its channel pages form the RGB(A) image.

    Raises
    ------
    ImageReadError
        If the bytes are empty, truncated or corrupt, the format is not PNG or TIFF, the
        dtype is not 8- or 16-bit unsigned, or the channel layout is not one listed above.
    """
    if not data:
        raise ImageReadError(f"{name}: the file is empty (0 bytes). Expected a PNG or TIFF image.")

    if data.startswith(_PNG_SIGNATURE):
        array = _decode_png(data, name)
    elif data.startswith(_TIFF_SIGNATURES):
        array = _decode_tiff(data, name)
    else:
        raise ImageReadError(
            f"{name}: not a PNG or TIFF file (first bytes {data[:8]!r}). "
            f"Convert the image to PNG or TIFF, 8- or 16-bit."
        )

    return _to_rgb(array, name)


def _decode_png(data: bytes, name: str) -> np.ndarray:
    # OpenCV 5.1 keeps 16-bit RGB PNGs at 16 bits and returns None on truncated data. Pillow
    # 13 (behind imageio) reduces 16-bit RGB to 8 bits and accepts a missing IEND chunk.
    buffer = np.frombuffer(data, dtype=np.uint8)
    try:
        array = cv2.imdecode(buffer, cv2.IMREAD_UNCHANGED)
    except cv2.error as error:
        raise ImageReadError(f"{name}: the PNG data cannot be decoded ({error}).") from error
    if array is None:
        raise ImageReadError(
            f"{name}: the PNG data cannot be decoded (truncated or corrupt, {len(data)} bytes). "
            f"Copy or export the file again."
        )

    # OpenCV returns colour images in BGR or BGRA order.
    if array.ndim == 3 and array.shape[2] == 3:
        array = array[:, :, ::-1]
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, [2, 1, 0, 3]]
    return array


def _decode_tiff(data: bytes, name: str) -> np.ndarray:
    # Any failure inside tifffile means the file is unreadable. tifffile raises TiffFileError
    # or ValueError for truncated files, and other types for other damage or a missing codec,
    # so the decoding boundary catches Exception.
    try:
        with tifffile.TiffFile(BytesIO(data)) as tiff:
            series = tiff.series[0] if tiff.series else None
            if (
                series is not None
                and tiff.is_imagej
                and series.axes.startswith("C")
                and series.shape[0] in (3, 4)
                and len(series.shape) == 3
            ):
                return np.moveaxis(series.asarray(), 0, -1)

            n_pages = len(tiff.pages)
            page = tiff.pages.first
            array = page.asarray()
            planar_separate = page.planarconfig == tifffile.PLANARCONFIG.SEPARATE
    except Exception as error:
        raise ImageReadError(
            f"{name}: the TIFF data cannot be decoded ({type(error).__name__}: {error}). "
            f"Check that the file is complete; compressed TIFFs other than deflate may need "
            f"the imagecodecs package."
        ) from error

    if n_pages > 1:
        warnings.warn(
            f"{name}: the TIFF has {n_pages} pages; only the first page is used.",
            UserWarning,
            stacklevel=3,
        )
        logger.warning("%s: TIFF with %d pages, using the first page", name, n_pages)

    if planar_separate and array.ndim == 3:
        array = np.moveaxis(array, 0, -1)
    return array


def _to_rgb(array: np.ndarray, name: str) -> np.ndarray:
    if array.dtype == np.bool_:
        array = array.astype(np.uint8) * np.uint8(255)
    if array.dtype not in (np.uint8, np.uint16):
        raise ImageReadError(
            f"{name}: pixel type {array.dtype} is not supported. Expected 8- or 16-bit unsigned "
            f"integers; convert the image, for example with Fiji (Image > Type > 16-bit)."
        )

    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)

    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 2, 3, 4) or min(array.shape[:2]) < 1:
        raise ImageReadError(
            f"{name}: unsupported image layout with shape {array.shape}. Expected (H, W) "
            f"grey, (H, W, C) or (C, H, W) with C in 1, 3, 4."
        )

    channels = array.shape[-1]
    if channels in (1, 2):
        # Grey, or grey plus alpha: the alpha channel is dropped like RGBA's.
        array = np.repeat(array[:, :, :1], 3, axis=2)
    elif channels == 4:
        array = array[:, :, :3]
    return np.ascontiguousarray(array)


def read_image(path: Path | str) -> np.ndarray:
    """Read a PNG or TIFF file into a raw RGB image.

    Parameters
    ----------
    path : pathlib.Path or str
        Image file.

    Returns
    -------
    numpy.ndarray
        Raw image (H, W, 3), uint8 or uint16, as :func:`decode_image` returns it.

    Raises
    ------
    ImageReadError
        If the file cannot be read or decoded. The message names the file.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise ImageReadError(f"{path}: the file cannot be read ({error}).") from error
    return decode_image(data, str(path))


def to_float(image: np.ndarray) -> np.ndarray:
    """Convert a raw image to float32 in [0, 1].

    Parameters
    ----------
    image : numpy.ndarray
        Raw uint8 or uint16 image, usually (H, W, 3). A float image is passed through
        (as float32) after checking that its values lie in [0, 1].

    Returns
    -------
    numpy.ndarray
        float32 array of the same shape, the raw values divided by the dtype maximum
        (255 or 65535).

    Raises
    ------
    ValueError
        If the dtype is not uint8, uint16 or floating point, or a float image has values
        outside [0, 1] or non-finite values.
    """
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    if image.dtype == np.uint16:
        return image.astype(np.float32) / np.float32(65535.0)
    if np.issubdtype(image.dtype, np.floating):
        if image.size and not (np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0):
            raise ValueError(
                f"image: float values must be finite and in [0, 1], got range "
                f"[{np.nanmin(image)}, {np.nanmax(image)}]. Divide by the maximum of the raw dtype."
            )
        return image.astype(np.float32, copy=False)
    raise ValueError(f"image: dtype {image.dtype} is not supported. Expected uint8, uint16 or float in [0, 1].")


def read_mask(path: Path | str) -> np.ndarray:
    """Read a binary mask file.

    Parameters
    ----------
    path : pathlib.Path or str
        PNG or TIFF mask, 8- or 16-bit, single channel or RGB with equal channels. Pixel
        values must take at most two levels, 0 (background) and one value ``v > 0`` (cell).

    Returns
    -------
    numpy.ndarray
        bool (H, W), True where the file contains ``v``. An all-zero file gives an all-False
        mask. A file that contains only one non-zero level gives an all-True mask, with a
        logged warning.

    Raises
    ------
    ImageReadError
        If the file cannot be decoded.
    DatasetError
        If the channels differ or the mask contains more than one non-zero level. The message
        lists the stray values.
    """
    path = Path(path)
    raw = read_image(path)

    if not (np.array_equal(raw[:, :, 0], raw[:, :, 1]) and np.array_equal(raw[:, :, 0], raw[:, :, 2])):
        raise DatasetError(
            f"{path}: mask channels differ, so it is not a binary mask. Expected a single-channel "
            f"mask, or RGB with equal channels, holding 0 for background and one value for cells."
        )

    plane = raw[:, :, 0]
    values, counts = np.unique(plane, return_counts=True)
    levels = [(int(value), int(count)) for value, count in zip(values, counts, strict=True) if value != 0]
    if not levels:
        return np.zeros(plane.shape, dtype=bool)

    # The most frequent non-zero value is the cell level, and any other level is stray.
    levels.sort(key=lambda level: level[1], reverse=True)
    cell_value = levels[0][0]
    stray = levels[1:]
    if stray:
        listed = ", ".join(f"{value} ({count} px)" for value, count in stray[:10])
        more = f" and {len(stray) - 10} more" if len(stray) > 10 else ""
        raise DatasetError(
            f"{path}: mask is not binary. Expected only 0 and {cell_value}, found stray values "
            f"{listed}{more}. Threshold the mask and save it without anti-aliasing or lossy "
            f"compression."
        )

    if len(values) == 1:
        logger.warning("%s: mask contains only the value %d, so every pixel is a cell", path, cell_value)
    return plane == cell_value


# --------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    """One image of a dataset and its mask file.

    Attributes
    ----------
    name : str
        File stem of the image, unique within the dataset.
    image_path : pathlib.Path
        Image file.
    mask_path : pathlib.Path or None
        Mask file with the same stem, or None when the dataset has no mask for the image.
    """

    name: str
    image_path: Path
    mask_path: Path | None


def _list_image_files(folder: Path) -> list[Path]:
    # Names starting with "." are skipped: they are hidden files, such as the "._name.png"
    # resource forks that macOS writes next to real images.
    files = [
        path
        for path in folder.iterdir()
        if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")
    ]
    return sorted(files, key=lambda path: path.name)


def _index_by_stem(files: list[Path], folder: Path) -> dict[str, Path]:
    by_stem: dict[str, list[Path]] = {}
    for path in files:
        by_stem.setdefault(path.stem, []).append(path)

    duplicates = {stem: paths for stem, paths in by_stem.items() if len(paths) > 1}
    if duplicates:
        listed = "; ".join(", ".join(path.name for path in paths) for paths in duplicates.values())
        raise DatasetError(
            f"{folder}: several files share a name stem ({listed}). Each image and mask needs a "
            f"unique stem; remove or rename the extra files."
        )
    return {stem: paths[0] for stem, paths in by_stem.items()}


def list_samples(root: Path | str, require_masks: bool) -> list[Sample]:
    """List the images of a dataset folder and match each to its mask.

    Parameters
    ----------
    root : pathlib.Path or str
        Folder holding ``images/`` and ``masks/``. Masks are matched to images by file stem,
        with any suffix in :data:`IMAGE_SUFFIXES` (case-insensitive). When ``require_masks``
        is False, ``root`` may instead hold the images directly.
    require_masks : bool
        If True, every image must have a mask (training and evaluation data).

    Returns
    -------
    list of Sample
        Sorted by name. ``mask_path`` is None for images without a mask.

    Raises
    ------
    DatasetError
        If ``root`` is missing or not a folder, contains no images or two files with the
        same stem, or (with ``require_masks``) lacks ``images/`` or a mask for some image.
        One error lists every image without a mask.
    """
    # Absolute paths, because Ray workers that read the samples run in another folder.
    root = Path(root).absolute()
    if not root.exists():
        raise DatasetError(f"{root}: dataset folder not found. Check the path.")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder. Expected a folder with images/ and masks/ subfolders.")

    images_dir = root / "images"
    masks_dir = root / "masks"
    if images_dir.is_dir():
        image_folder = images_dir
    elif require_masks:
        raise DatasetError(
            f"{root}: no images/ subfolder. A dataset with masks needs images/ and masks/ "
            f"subfolders whose files are matched by name stem."
        )
    else:
        image_folder = root

    image_files = _list_image_files(image_folder)
    if not image_files:
        raise DatasetError(
            f"{image_folder}: no images found. Expected files ending in "
            f"{', '.join(IMAGE_SUFFIXES)} (any case)."
        )
    images = _index_by_stem(image_files, image_folder)

    masks: dict[str, Path] = {}
    if image_folder == images_dir and masks_dir.is_dir():
        masks = _index_by_stem(_list_image_files(masks_dir), masks_dir)

    if require_masks:
        missing = [images[stem].name for stem in sorted(images) if stem not in masks]
        if missing:
            where = f"{masks_dir}" if masks_dir.is_dir() else f"{masks_dir} (folder not found)"
            raise DatasetError(
                f"{len(missing)} of {len(images)} images have no mask in {where}: "
                f"{', '.join(missing)}. Add a mask with the same file stem for each image, "
                f"or remove the image."
            )

    orphans = sorted(set(masks) - set(images))
    if orphans:
        logger.warning("%s: %d masks have no image and are ignored: %s", masks_dir, len(orphans), ", ".join(orphans))

    return [Sample(name=stem, image_path=images[stem], mask_path=masks.get(stem)) for stem in sorted(images)]


def split_samples(
    samples: Sequence[Sample], val_fraction: float = 0.25, seed: int = 0
) -> tuple[list[Sample], list[Sample]]:
    """Split samples by image into a training part and a validation part.

    Parameters
    ----------
    samples : sequence of Sample
        Samples to split. The result does not depend on their order.
    val_fraction : float
        Fraction of images for validation, in (0, 1). The number of validation images is
        ``round(len(samples) * val_fraction)``, clamped so that each part contains at least one
        image when there are two or more.
    seed : int
        Seed of the random permutation, so the same seed gives the same split.

    Returns
    -------
    tuple of (list of Sample, list of Sample)
        Training and validation samples, each sorted by name, without overlap. With fewer
        than two samples, every sample goes to training and validation is empty.

    Raises
    ------
    ValueError
        If ``val_fraction`` is not strictly between 0 and 1.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}.")

    ordered = sorted(samples, key=lambda sample: sample.name)
    if len(ordered) < 2:
        logger.warning("split_samples: %d sample(s), so the validation part is empty", len(ordered))
        return ordered, []

    n_val = min(max(round(len(ordered) * val_fraction), 1), len(ordered) - 1)
    permutation = np.random.default_rng(seed).permutation(len(ordered))
    val_indices = set(permutation[:n_val].tolist())
    train = [sample for index, sample in enumerate(ordered) if index not in val_indices]
    val = [sample for index, sample in enumerate(ordered) if index in val_indices]
    return train, val


def _file_sha256(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def dataset_fingerprint(samples: Sequence[Sample]) -> str:
    """Compute a content hash of a dataset.

    Parameters
    ----------
    samples : sequence of Sample
        Samples to hash. The order does not matter.

    Returns
    -------
    str
        Hex SHA-256 over the samples sorted by name, each contributing its name and the
        SHA-256 of its image and mask file contents. File names and dates other than the
        sample name do not enter the hash, so copies of a dataset hash the same.
    """
    digest = hashlib.sha256()
    for sample in sorted(samples, key=lambda sample: sample.name):
        mask_hash = _file_sha256(sample.mask_path) if sample.mask_path is not None else "no-mask"
        digest.update(f"{sample.name}\0{_file_sha256(sample.image_path)}\0{mask_hash}\n".encode())
    return digest.hexdigest()


def load_pair(sample: Sample) -> tuple[np.ndarray, np.ndarray]:
    """Read the image and mask of a sample.

    Parameters
    ----------
    sample : Sample
        Sample with a mask.

    Returns
    -------
    tuple of (numpy.ndarray, numpy.ndarray)
        Float image float32 (H, W, 3) in [0, 1] and mask bool (H, W), True for cells.

    Raises
    ------
    DatasetError
        If the sample has no mask, the mask is not binary, or its size differs from the
        image's.
    ImageReadError
        If a file cannot be decoded.
    """
    if sample.mask_path is None:
        raise DatasetError(f"{sample.image_path}: no mask for this image. Add a mask with the same stem to masks/.")

    image = to_float(read_image(sample.image_path))
    mask = read_mask(sample.mask_path)
    if mask.shape != image.shape[:2]:
        raise DatasetError(
            f"{sample.mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} (width x height) differs "
            f"from the image {sample.image_path} of size {image.shape[1]}x{image.shape[0]}. "
            f"Use a mask drawn on the same image at the same size."
        )
    return image, mask


# --------------------------------------------------------------------------------------
# Resampling
# --------------------------------------------------------------------------------------


def _check_scale(scale: float) -> None:
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number above 0, got {scale}.")


def scaled_shape(shape: tuple[int, ...], scale: float) -> tuple[int, int]:
    """Return the (height, width) that resampling ``shape`` by ``scale`` gives.

    Parameters
    ----------
    shape : tuple of int
        Array shape. Only the first two entries, (H, W), are used.
    scale : float
        Resampling factor, above 0.

    Returns
    -------
    tuple of (int, int)
        ``(max(1, round(H * scale)), max(1, round(W * scale)))``.
    """
    _check_scale(scale)
    return max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))


def resize_image(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a float image to an exact size.

    Parameters
    ----------
    image : numpy.ndarray
        float32 (H, W) or (H, W, C), for example a float image or a probability map.
    shape : tuple of (int, int)
        Output (height, width) in pixels.

    Returns
    -------
    numpy.ndarray
        float32 of shape ``shape`` (plus the channel axis). Shrinking uses area averaging,
        which is anti-aliased, and enlarging uses bilinear interpolation. Neither leaves the
        input's value range.
    """
    height, width = shape
    if (height, width) == image.shape[:2]:
        return image
    shrinking = height * width < image.shape[0] * image.shape[1]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    resized = cv2.resize(image.astype(np.float32, copy=False), (width, height), interpolation=interpolation)
    if image.ndim == 3 and resized.ndim == 2:
        resized = resized[:, :, None]
    return resized


def resample_image(image: np.ndarray, scale: float) -> np.ndarray:
    """Resample a float image by a scale factor.

    Parameters
    ----------
    image : numpy.ndarray
        float32 (H, W, 3) in [0, 1], or float32 (H, W).
    scale : float
        Factor applied to both sides, so 0.5 halves them. The output size is
        :func:`scaled_shape`.

    Returns
    -------
    numpy.ndarray
        The resampled float32 image (area averaging when shrinking, bilinear when
        enlarging). With ``scale == 1`` the input object itself is returned.
    """
    _check_scale(scale)
    if scale == 1:
        return image
    return resize_image(image, scaled_shape(image.shape, scale))


def _remove_label_contacts(labels: np.ndarray) -> np.ndarray:
    """Remove every labelled pixel that has an 8-neighbour with a smaller non-zero label.

    Afterwards no two different labels touch, even diagonally, so each label can be one
    8-connected component of the binary mask. Modifies and returns the int32 ``labels``.
    """
    n_labels = int(labels.max())
    if n_labels == 0:
        return labels
    if n_labels < 2**24:
        # float32 represents these labels exactly, and OpenCV's 3x3 erosion (a minimum
        # filter) is several times faster than scipy's on float32.
        filled = labels.astype(np.float32)
        filled[labels == 0] = np.inf
        neighbour_min = cv2.erode(filled, np.ones((3, 3), np.uint8), borderType=cv2.BORDER_REPLICATE)
        labels[neighbour_min < filled] = 0
    else:
        filled = np.where(labels > 0, labels, np.iinfo(np.int32).max).astype(np.int32)
        neighbour_min = ndimage.minimum_filter(filled, size=3, mode="nearest")
        labels[(labels > 0) & (neighbour_min < labels)] = 0
    return labels


def resize_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a bool mask to an exact size so it stays binary and cells stay apart.

    Parameters
    ----------
    mask : numpy.ndarray
        bool (H, W), True for cells.
    shape : tuple of (int, int)
        Output (height, width) in pixels.

    Returns
    -------
    numpy.ndarray
        bool mask of shape ``shape``. A pixel is True when at least half of its area was
        True (area averaging when shrinking, bilinear when enlarging). Cells that were
        separate 8-connected components stay separated by at least one background pixel,
        so shrinking does not merge touching cells. A cell smaller than about one output
        pixel can vanish.
    """
    height, width = shape
    if (height, width) == mask.shape:
        return mask

    foreground = resize_image(mask.astype(np.float32), shape) >= 0.5
    labels, n_cells = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n_cells == 0 or not foreground.any():
        return np.zeros(shape, dtype=bool)

    # Nearest-neighbour label of each output pixel centre.
    rows = np.minimum(((np.arange(height) + 0.5) * mask.shape[0] / height).astype(np.intp), mask.shape[0] - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * mask.shape[1] / width).astype(np.intp), mask.shape[1] - 1)
    resized_labels = labels[rows[:, None], cols[None, :]].astype(np.int32)

    # Foreground pixels whose centre fell on background take the label of the nearest
    # labelled pixel.
    unlabelled = foreground & (resized_labels == 0)
    if unlabelled.any():
        _, (near_rows, near_cols) = ndimage.distance_transform_edt(resized_labels == 0, return_indices=True)
        resized_labels[unlabelled] = resized_labels[near_rows[unlabelled], near_cols[unlabelled]]

    resized_labels[~foreground] = 0
    return _remove_label_contacts(resized_labels) > 0


def resample_mask(mask: np.ndarray, scale: float) -> np.ndarray:
    """Resample a bool mask by a scale factor so it stays binary.

    Parameters
    ----------
    mask : numpy.ndarray
        bool (H, W), True for cells.
    scale : float
        Factor applied to both sides. The output size is :func:`scaled_shape`.

    Returns
    -------
    numpy.ndarray
        bool mask as :func:`resize_mask` returns it. With ``scale == 1`` the input object
        itself is returned.
    """
    _check_scale(scale)
    if scale == 1:
        return mask
    return resize_mask(mask, scaled_shape(mask.shape, scale))


# --------------------------------------------------------------------------------------
# Training crops
# --------------------------------------------------------------------------------------


def network_crop_size(crop_size: int, scale: float) -> int:
    """Return the side of a network crop: ``round(crop_size * scale)`` rounded up to a multiple of 32.

    Parameters
    ----------
    crop_size : int
        Crop side in pixels of the original image, above 0.
    scale : float
        Resampling factor, above 0.

    Returns
    -------
    int
        Side in network (resampled) pixels, a positive multiple of 32.
    """
    if crop_size <= 0:
        raise ValueError(f"crop_size must be a positive number of pixels, got {crop_size}.")
    _check_scale(scale)
    side = max(1, round(crop_size * scale))
    return math.ceil(side / NETWORK_INPUT_MULTIPLE) * NETWORK_INPUT_MULTIPLE


def _pad_to(image: np.ndarray, mask: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    pad_rows = max(0, height - image.shape[0])
    pad_cols = max(0, width - image.shape[1])
    if pad_rows == 0 and pad_cols == 0:
        return image, mask
    rows = (pad_rows // 2, pad_rows - pad_rows // 2)
    cols = (pad_cols // 2, pad_cols - pad_cols // 2)
    # A one-pixel side cannot be reflected, so it is repeated instead.
    image_mode = "reflect" if min(image.shape[:2]) > 1 else "edge"
    image = np.pad(image, (rows, cols, (0, 0)), mode=image_mode)
    mask = np.pad(mask, (rows, cols), mode="constant", constant_values=0)
    return image, mask


def _random_window(
    image: np.ndarray, mask: np.ndarray, height: int, width: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    image, mask = _pad_to(image, mask, height, width)
    top = int(rng.integers(0, image.shape[0] - height + 1))
    left = int(rng.integers(0, image.shape[1] - width + 1))
    return image[top : top + height, left : left + width], mask[top : top + height, left : left + width]


class CropDataset(torch.utils.data.Dataset):
    """Random square crops of images and masks for training and validation.

    Parameters
    ----------
    images : list of numpy.ndarray
        Float images, float32 (H, W, 3) in [0, 1], at the original resolution.
    masks : list of numpy.ndarray
        bool (H, W) masks matching ``images``, True for cells.
    crop_size : int
        Crop side in pixels of the original image.
    scale : float
        Resampling factor applied once to every image and mask at construction. The network
        receives crops of side :attr:`network_crop` = ``round(crop_size * scale)`` rounded up to
        a multiple of 32.
    length : int
        Number of items (crops) per epoch. Item ``i`` is cut from image ``i % len(images)``.
    augment : bool
        If True, apply :func:`ccflow.augment.training_transform` with randomness drawn from
        ``(seed, epoch, index)``. If False, the crop position depends only on
        ``(seed, index)`` and no augmentation is applied, which suits validation.
    seed : int
        Base seed.

    Notes
    -----
    Images smaller than the crop are padded, by reflection for the image and with 0 for the
    mask. DataLoader workers hold copies of the dataset, so call :meth:`set_epoch` before
    creating each epoch's iterator and do not use persistent workers.
    """

    def __init__(
        self,
        images: Sequence[np.ndarray],
        masks: Sequence[np.ndarray],
        *,
        crop_size: int,
        scale: float = 1.0,
        length: int,
        augment: bool,
        seed: int = 0,
    ) -> None:
        if len(images) == 0:
            raise ValueError("images: expected at least one image, got an empty list.")
        if len(images) != len(masks):
            raise ValueError(f"images and masks must have the same length, got {len(images)} and {len(masks)}.")
        if length <= 0:
            raise ValueError(f"length must be a positive number of crops, got {length}.")
        self.network_crop = network_crop_size(crop_size, scale)

        self.images: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        for index, (image, mask) in enumerate(zip(images, masks, strict=True)):
            if image.ndim != 3 or image.shape[2] != 3 or not np.issubdtype(image.dtype, np.floating):
                raise ValueError(
                    f"images[{index}]: expected a float image (H, W, 3) in [0, 1], got dtype "
                    f"{image.dtype} and shape {image.shape}. Convert it with ccflow.data.to_float."
                )
            if mask.shape != image.shape[:2]:
                raise ValueError(
                    f"masks[{index}]: shape {mask.shape} differs from the image's {image.shape[:2]}."
                )
            self.images.append(np.ascontiguousarray(resample_image(image.astype(np.float32, copy=False), scale)))
            self.masks.append(np.ascontiguousarray(resample_mask(mask.astype(bool, copy=False), scale)))

        self.crop_size = crop_size
        self.scale = scale
        self.length = length
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        self._transform = None
        if augment:
            from ccflow.augment import training_transform

            self._transform = training_transform(self.network_crop)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with the seed and the index, seeds augmented crops."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return crop ``index``: image float32 (3, h, w) in [0, 1] and mask float32 (1, h, w) of 0 and 1."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is out of range for a dataset of {self.length} crops.")
        image = self.images[index % len(self.images)]
        mask = self.masks[index % len(self.masks)]
        side = self.network_crop

        if self._transform is None:
            rng = np.random.default_rng([self.seed, index])
            crop, crop_mask = _random_window(image, mask, side, side, rng)
            crop_mask = crop_mask.astype(np.float32)
        else:
            rng = np.random.default_rng([self.seed, self.epoch, index])
            context = math.ceil(side * _AUGMENT_CONTEXT)
            window_height = max(side, min(context, image.shape[0]))
            window_width = max(side, min(context, image.shape[1]))
            window, window_mask = _random_window(image, mask, window_height, window_width, rng)
            self._transform.set_random_seed(int(rng.integers(0, 2**31 - 1)))
            result = self._transform(image=np.ascontiguousarray(window), mask=window_mask.astype(np.uint8))
            crop = result["image"]
            crop_mask = (result["mask"] > 0).astype(np.float32)

        image_tensor = torch.from_numpy(np.ascontiguousarray(crop.transpose(2, 0, 1), dtype=np.float32))
        mask_tensor = torch.from_numpy(np.ascontiguousarray(crop_mask[None]))
        return image_tensor, mask_tensor
