"""Tests of image and mask reading, dataset listing and splitting, and training crops."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import tifffile
import torch
from skimage.measure import label

from ccflow.data import (
    CropDataset,
    Sample,
    dataset_fingerprint,
    decode_image,
    list_samples,
    load_pair,
    network_crop_size,
    read_image,
    read_mask,
    resample_image,
    resample_mask,
    resize_image,
    resize_mask,
    scaled_shape,
    split_samples,
    to_float,
)
from ccflow.errors import DatasetError, ImageReadError
from tests.conftest import FNC_SAMPLE_COUNTS


def write_png(path: Path, array: np.ndarray) -> Path:
    """Write an RGB(A) or grey array as PNG, converting to OpenCV's BGR(A) order."""
    if array.ndim == 3 and array.shape[2] == 3:
        array = array[:, :, ::-1]
    elif array.ndim == 3 and array.shape[2] == 4:
        array = array[:, :, [2, 1, 0, 3]]
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.ascontiguousarray(array))
    return path


def random_image(shape: tuple[int, ...], dtype: type = np.uint8, seed: int = 0) -> np.ndarray:
    maximum = np.iinfo(dtype).max
    return np.random.default_rng(seed).integers(0, maximum, size=shape, endpoint=True, dtype=dtype)


def make_dataset(root: Path, names: list[str], masks_for: list[str] | None = None) -> Path:
    """Write small image files and 0/255 masks into root/images and root/masks."""
    masks_for = names if masks_for is None else masks_for
    for index, name in enumerate(names):
        write_png(root / "images" / f"{name}.png", random_image((20, 24, 3), seed=index))
    for index, name in enumerate(masks_for):
        mask = np.zeros((20, 24), dtype=np.uint8)
        mask[5 + index % 5 : 10, 4:12] = 255
        write_png(root / "masks" / f"{name}.png", mask)
    return root


# --------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------


def test_read_png_8bit_rgb(tmp_path: Path) -> None:
    expected = random_image((30, 40, 3))
    image = read_image(write_png(tmp_path / "a.png", expected))
    assert image.dtype == np.uint8
    assert image.shape == (30, 40, 3)
    assert np.array_equal(image, expected)


def test_read_png_16bit_rgb(tmp_path: Path) -> None:
    expected = random_image((30, 40, 3), np.uint16)
    image = read_image(write_png(tmp_path / "a.png", expected))
    assert image.dtype == np.uint16
    assert np.array_equal(image, expected)


def test_read_png_grey_replicated(tmp_path: Path) -> None:
    grey = random_image((30, 40))
    image = read_image(write_png(tmp_path / "grey.png", grey))
    assert image.shape == (30, 40, 3)
    for channel in range(3):
        assert np.array_equal(image[:, :, channel], grey)


def test_read_png_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = random_image((30, 40, 4))
    image = read_image(write_png(tmp_path / "rgba.png", rgba))
    assert image.shape == (30, 40, 3)
    assert np.array_equal(image, rgba[:, :, :3])


def test_read_tiff_16bit_single_channel(tmp_path: Path) -> None:
    grey = random_image((30, 40), np.uint16)
    tifffile.imwrite(tmp_path / "grey.tif", grey)
    image = read_image(tmp_path / "grey.tif")
    assert image.dtype == np.uint16
    assert image.shape == (30, 40, 3)
    assert np.array_equal(image[:, :, 1], grey)


def test_read_tiff_channels_first(tmp_path: Path) -> None:
    planar = random_image((3, 30, 40))
    tifffile.imwrite(tmp_path / "planar.tif", planar, photometric="rgb", planarconfig="separate")
    image = read_image(tmp_path / "planar.tif")
    assert image.shape == (30, 40, 3)
    assert np.array_equal(image, np.moveaxis(planar, 0, -1))


def test_read_tiff_imagej_channels(tmp_path: Path) -> None:
    planes = random_image((3, 30, 40), np.uint16)
    tifffile.imwrite(tmp_path / "hyperstack.tif", planes, imagej=True, metadata={"axes": "CYX"})
    image = read_image(tmp_path / "hyperstack.tif")
    assert np.array_equal(image, np.moveaxis(planes, 0, -1))


def test_read_tiff_channels_last(tmp_path: Path) -> None:
    expected = random_image((30, 40, 3))
    tifffile.imwrite(tmp_path / "rgb.TIFF", expected, photometric="rgb")
    assert np.array_equal(read_image(tmp_path / "rgb.TIFF"), expected)


def test_read_tiff_multipage_uses_first(tmp_path: Path) -> None:
    pages = [random_image((30, 40, 3), seed=seed) for seed in range(3)]
    with tifffile.TiffWriter(tmp_path / "stack.tif") as writer:
        for page in pages:
            writer.write(page, photometric="rgb")
    with pytest.warns(UserWarning, match="3 pages"):
        image = read_image(tmp_path / "stack.tif")
    assert np.array_equal(image, pages[0])


def test_read_truncated_png_names_file(tmp_path: Path) -> None:
    path = write_png(tmp_path / "whole.png", random_image((30, 40, 3)))
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ImageReadError, match="truncated.png"):
        read_image(truncated)


def test_read_truncated_tiff_names_file(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "whole.tif", random_image((30, 40), np.uint16))
    truncated = tmp_path / "cut.tif"
    truncated.write_bytes((tmp_path / "whole.tif").read_bytes()[:300])
    with pytest.raises(ImageReadError, match="cut.tif"):
        read_image(truncated)


def test_read_random_bytes_names_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.png"
    path.write_bytes(np.random.default_rng(0).bytes(2000))
    with pytest.raises(ImageReadError, match="noise.png") as caught:
        read_image(path)
    assert "PNG or TIFF" in str(caught.value)


def test_read_empty_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.tif"
    path.write_bytes(b"")
    with pytest.raises(ImageReadError, match="empty.tif"):
        read_image(path)


def test_read_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageReadError, match="absent.png"):
        read_image(tmp_path / "absent.png")


def test_read_float_tiff_rejected(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "float.tif", np.zeros((10, 12), dtype=np.float32))
    with pytest.raises(ImageReadError, match="float32"):
        read_image(tmp_path / "float.tif")


def test_decode_image_uses_given_name() -> None:
    with pytest.raises(ImageReadError, match="upload-7"):
        decode_image(b"\x89PNG\r\n\x1a\nbroken", "upload-7")


def test_to_float_scales_by_dtype_max() -> None:
    eight_bit = np.array([[[0, 255, 51]]], dtype=np.uint8)
    sixteen_bit = np.array([[[0, 65535, 13107]]], dtype=np.uint16)
    assert np.allclose(to_float(eight_bit), [[[0.0, 1.0, 0.2]]])
    assert np.allclose(to_float(sixteen_bit), [[[0.0, 1.0, 0.2]]])
    assert to_float(eight_bit).dtype == np.float32
    assert to_float(sixteen_bit).dtype == np.float32


def test_to_float_checks_float_range() -> None:
    valid = np.full((2, 2, 3), 0.5, dtype=np.float64)
    assert to_float(valid).dtype == np.float32
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_float(np.full((2, 2, 3), 1.5, dtype=np.float32))
    with pytest.raises(ValueError, match="int32"):
        to_float(np.zeros((2, 2, 3), dtype=np.int32))


# --------------------------------------------------------------------------------------
# Masks
# --------------------------------------------------------------------------------------


def test_read_mask_binary_8bit(tmp_path: Path) -> None:
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[5:10, 5:15] = 255
    result = read_mask(write_png(tmp_path / "mask.png", mask))
    assert result.dtype == np.bool_
    assert np.array_equal(result, mask > 0)


def test_read_mask_16bit_levels(tmp_path: Path) -> None:
    mask = np.zeros((20, 30), dtype=np.uint16)
    mask[2:4, 2:4] = 1
    assert np.array_equal(read_mask(write_png(tmp_path / "mask.png", mask)), mask > 0)


def test_read_mask_rgb_equal_channels(tmp_path: Path) -> None:
    mask = np.zeros((20, 30, 3), dtype=np.uint8)
    mask[5:10, 5:15] = 255
    assert np.array_equal(read_mask(write_png(tmp_path / "mask.png", mask)), mask[:, :, 0] > 0)


def test_read_mask_all_zero(tmp_path: Path) -> None:
    result = read_mask(write_png(tmp_path / "mask.png", np.zeros((20, 30), dtype=np.uint8)))
    assert not result.any()


def test_read_mask_stray_value_listed(tmp_path: Path) -> None:
    mask = np.zeros((20, 30), dtype=np.uint8)
    mask[5:10, 5:15] = 255
    mask[0, 0] = 128
    path = write_png(tmp_path / "grey_edge.png", mask)
    with pytest.raises(DatasetError, match="grey_edge.png") as caught:
        read_mask(path)
    assert "128" in str(caught.value)


def test_read_mask_colour_rejected(tmp_path: Path) -> None:
    mask = np.zeros((20, 30, 3), dtype=np.uint8)
    mask[5:10, 5:15, 0] = 255
    with pytest.raises(DatasetError, match="channels differ"):
        read_mask(write_png(tmp_path / "colour.png", mask))


def test_load_pair_size_mismatch(tmp_path: Path) -> None:
    image_path = write_png(tmp_path / "images" / "a.png", random_image((20, 30, 3)))
    mask_path = write_png(tmp_path / "masks" / "a.png", np.zeros((21, 30), dtype=np.uint8))
    with pytest.raises(DatasetError, match="a.png") as caught:
        load_pair(Sample("a", image_path, mask_path))
    assert "30x21" in str(caught.value)
    assert "30x20" in str(caught.value)


def test_load_pair_returns_float_and_bool(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, ["a"])
    image, mask = load_pair(list_samples(root, require_masks=True)[0])
    assert image.dtype == np.float32
    assert image.shape == (20, 24, 3)
    assert mask.dtype == np.bool_
    assert mask.shape == (20, 24)


def test_load_pair_without_mask(tmp_path: Path) -> None:
    image_path = write_png(tmp_path / "a.png", random_image((20, 30, 3)))
    with pytest.raises(DatasetError, match="no mask"):
        load_pair(Sample("a", image_path, None))


# --------------------------------------------------------------------------------------
# Listing, splitting, fingerprints
# --------------------------------------------------------------------------------------


def test_list_samples_matches_by_stem(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, ["b", "a"])
    write_png(tmp_path / "images" / "c.PNG", random_image((20, 24, 3)))
    tifffile.imwrite(tmp_path / "masks" / "c.tif", np.zeros((20, 24), dtype=np.uint8))
    (tmp_path / "images" / ".hidden.png").write_bytes(b"not an image")
    (tmp_path / "images" / "notes.txt").write_text("ignored")

    samples = list_samples(root, require_masks=True)
    assert [sample.name for sample in samples] == ["a", "b", "c"]
    assert samples[2].image_path.name == "c.PNG"
    assert samples[2].mask_path is not None
    assert samples[2].mask_path.name == "c.tif"


def test_list_samples_missing_masks_allowed(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, ["a", "b", "c"], masks_for=["b"])
    samples = list_samples(root, require_masks=False)
    assert [sample.mask_path is None for sample in samples] == [True, False, True]


def test_list_samples_missing_masks_listed(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, ["a", "b", "c"], masks_for=["b"])
    with pytest.raises(DatasetError, match="2 of 3 images have no mask") as caught:
        list_samples(root, require_masks=True)
    assert "a.png" in str(caught.value)
    assert "c.png" in str(caught.value)
    assert "b.png" not in str(caught.value)


def test_list_samples_no_masks_folder(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, ["a"], masks_for=[])
    with pytest.raises(DatasetError, match="folder not found"):
        list_samples(root, require_masks=True)


def test_list_samples_flat_folder(tmp_path: Path) -> None:
    write_png(tmp_path / "one.png", random_image((20, 24, 3)))
    tifffile.imwrite(tmp_path / "two.tiff", random_image((20, 24), np.uint16))
    samples = list_samples(tmp_path, require_masks=False)
    assert [sample.name for sample in samples] == ["one", "two"]
    assert all(sample.mask_path is None for sample in samples)
    with pytest.raises(DatasetError, match="no images/ subfolder"):
        list_samples(tmp_path, require_masks=True)


def test_list_samples_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="no images found"):
        list_samples(tmp_path, require_masks=False)


def test_list_samples_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="not found") as caught:
        list_samples(tmp_path / "nowhere", require_masks=False)
    assert "nowhere" in str(caught.value)


def test_list_samples_duplicate_stems(tmp_path: Path) -> None:
    root = make_dataset(tmp_path, ["a"])
    tifffile.imwrite(tmp_path / "images" / "a.tif", random_image((20, 24), np.uint16))
    with pytest.raises(DatasetError, match="a.png, a.tif"):
        list_samples(root, require_masks=True)


def fake_samples(count: int) -> list[Sample]:
    return [Sample(f"img_{index:02d}", Path(f"img_{index:02d}.png"), None) for index in range(count)]


def test_split_samples_quarter_by_image() -> None:
    samples = fake_samples(8)
    train, val = split_samples(samples, val_fraction=0.25, seed=3)
    assert len(train) == 6
    assert len(val) == 2
    assert not {sample.name for sample in train} & {sample.name for sample in val}
    assert sorted(train + val, key=lambda sample: sample.name) == samples


def test_split_samples_seeded() -> None:
    samples = fake_samples(12)
    first = split_samples(samples, seed=7)
    assert split_samples(samples, seed=7) == first
    assert split_samples(list(reversed(samples)), seed=7) == first
    other_splits = {tuple(s.name for s in split_samples(samples, seed=seed)[1]) for seed in range(10)}
    assert len(other_splits) > 1


def test_split_samples_small_sets() -> None:
    train, val = split_samples(fake_samples(2))
    assert len(train) == 1
    assert len(val) == 1
    train, val = split_samples(fake_samples(1))
    assert len(train) == 1
    assert val == []
    with pytest.raises(ValueError, match="val_fraction"):
        split_samples(fake_samples(4), val_fraction=1.0)


def test_fingerprint_changes_with_mask_byte(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "data", ["a", "b"])
    samples = list_samples(root, require_masks=True)
    before = dataset_fingerprint(samples)
    assert dataset_fingerprint(list(reversed(samples))) == before

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    assert dataset_fingerprint(list_samples(copy, require_masks=True)) == before

    mask_path = samples[1].mask_path
    assert mask_path is not None
    mask = cv2.imread(str(mask_path), cv2.IMREAD_UNCHANGED)
    mask[0, 0] = 255 - mask[0, 0]
    write_png(mask_path, mask)
    assert dataset_fingerprint(samples) != before


def test_fnc_sample_images(fnc_sample_dir: Path) -> None:
    samples = list_samples(fnc_sample_dir, require_masks=True)
    assert [sample.name for sample in samples] == sorted(FNC_SAMPLE_COUNTS)
    for sample in samples:
        raw = read_image(sample.image_path)
        assert raw.dtype == np.uint8
        assert raw.shape == (1200, 1600, 3)

        image, mask = load_pair(sample)
        assert image.dtype == np.float32
        assert mask.dtype == np.bool_
        assert mask.shape == (1200, 1600)
        count = int(label(mask, connectivity=2).max())
        assert count == FNC_SAMPLE_COUNTS[sample.name], sample.name


def test_fnc_sample_split(fnc_sample_dir: Path) -> None:
    samples = list_samples(fnc_sample_dir, require_masks=True)
    train, val = split_samples(samples, val_fraction=0.25, seed=0)
    assert len(train) == 3
    assert len(val) == 1
    assert split_samples(samples, val_fraction=0.25, seed=0) == (train, val)


# --------------------------------------------------------------------------------------
# Resampling and crops
# --------------------------------------------------------------------------------------


def test_resample_identity_returns_input() -> None:
    image = np.zeros((10, 12, 3), dtype=np.float32)
    mask = np.zeros((10, 12), dtype=bool)
    assert resample_image(image, 1.0) is image
    assert resample_mask(mask, 1.0) is mask


def test_resample_half_size() -> None:
    image = np.random.default_rng(0).random((101, 60, 3), dtype=np.float32)
    half = resample_image(image, 0.5)
    assert half.shape == (50, 30, 3)
    assert half.dtype == np.float32
    assert scaled_shape(image.shape, 0.5) == (50, 30)
    assert 0.0 <= half.min()
    assert half.max() <= 1.0
    with pytest.raises(ValueError, match="scale"):
        resample_image(image, 0.0)


def test_resize_image_probability_map() -> None:
    probability = np.random.default_rng(0).random((60, 80), dtype=np.float32)
    resized = resize_image(probability, (45, 61))
    assert resized.shape == (45, 61)
    assert resized.dtype == np.float32
    assert resize_image(probability, (60, 80)) is probability


def test_resample_mask_keeps_cells_apart() -> None:
    mask = np.zeros((40, 40), dtype=bool)
    mask[10:30, 5:19] = True
    mask[10:30, 20:35] = True  # one background column between the two cells
    half = resample_mask(mask, 0.5)
    assert half.dtype == np.bool_
    assert half.shape == (20, 20)
    assert label(half, connectivity=2).max() == 2
    double = resize_mask(mask, (80, 80))
    assert label(double, connectivity=2).max() == 2


def test_network_crop_size_multiple_of_32() -> None:
    assert network_crop_size(100, 1.0) == 128
    assert network_crop_size(256, 0.5) == 128
    assert network_crop_size(512, 1.0) == 512
    assert network_crop_size(10, 0.5) == 32


def crop_inputs(count: int = 2, shape: tuple[int, int] = (150, 170)) -> tuple[list[np.ndarray], list[np.ndarray]]:
    rng = np.random.default_rng(1)
    images = [rng.random((*shape, 3), dtype=np.float32) for _ in range(count)]
    masks = [rng.random(shape) > 0.7 for _ in range(count)]
    return images, masks


def test_crop_dataset_shapes() -> None:
    images, masks = crop_inputs()
    dataset = CropDataset(images, masks, crop_size=100, length=5, augment=False)
    assert dataset.network_crop == 128
    assert len(dataset) == 5
    image, mask = dataset[3]
    assert image.dtype == torch.float32
    assert image.shape == (3, 128, 128)
    assert mask.dtype == torch.float32
    assert mask.shape == (1, 128, 128)


def test_crop_dataset_validation_deterministic() -> None:
    images, masks = crop_inputs()
    first = CropDataset(images, masks, crop_size=64, length=4, augment=False, seed=5)
    second = CropDataset(images, masks, crop_size=64, length=4, augment=False, seed=5)
    second.set_epoch(3)
    for index in range(4):
        assert torch.equal(first[index][0], second[index][0])
        assert torch.equal(first[index][1], second[index][1])


def test_crop_dataset_uses_image_index_modulo() -> None:
    images = [np.full((64, 64, 3), value, dtype=np.float32) for value in (0.1, 0.9)]
    masks = [np.zeros((64, 64), dtype=bool)] * 2
    dataset = CropDataset(images, masks, crop_size=64, length=4, augment=False)
    assert [round(float(dataset[index][0].mean()), 3) for index in range(4)] == [0.1, 0.9, 0.1, 0.9]


def test_crop_dataset_augment_repeatable() -> None:
    images, masks = crop_inputs()
    first = CropDataset(images, masks, crop_size=64, length=3, augment=True, seed=2)
    second = CropDataset(images, masks, crop_size=64, length=3, augment=True, seed=2)
    first.set_epoch(4)
    second.set_epoch(4)
    for index in range(3):
        assert torch.equal(first[index][0], second[index][0])
        assert torch.equal(first[index][1], second[index][1])

    epoch_four = first[0][0].clone()
    first.set_epoch(5)
    assert not torch.equal(first[0][0], epoch_four)


def test_crop_dataset_mask_binary() -> None:
    images, masks = crop_inputs()
    for augment in (False, True):
        dataset = CropDataset(images, masks, crop_size=64, length=6, augment=augment)
        for index in range(len(dataset)):
            image, mask = dataset[index]
            assert set(torch.unique(mask).tolist()) <= {0.0, 1.0}
            assert float(image.min()) >= 0.0
            assert float(image.max()) <= 1.0


def test_crop_dataset_pads_small_image() -> None:
    image = np.random.default_rng(0).random((40, 50, 3), dtype=np.float32)
    mask = np.ones((40, 50), dtype=bool)
    dataset = CropDataset([image], [mask], crop_size=64, length=2, augment=False)
    crop, crop_mask = dataset[0]
    assert crop.shape == (3, 64, 64)
    # The whole image lies inside the crop, and the padding is background.
    assert float(crop_mask.sum()) == 40 * 50
    augmented = CropDataset([image], [mask], crop_size=64, length=2, augment=True)
    assert augmented[1][0].shape == (3, 64, 64)


def test_crop_dataset_scale_half() -> None:
    images, masks = crop_inputs(count=1, shape=(300, 340))
    dataset = CropDataset(images, masks, crop_size=256, scale=0.5, length=2, augment=False)
    assert dataset.network_crop == 128
    assert dataset.images[0].shape == (150, 170, 3)
    assert dataset.masks[0].shape == (150, 170)
    assert dataset[0][0].shape == (3, 128, 128)


def test_crop_dataset_rejects_mismatch() -> None:
    images, masks = crop_inputs()
    with pytest.raises(ValueError, match="same length"):
        CropDataset(images, masks[:1], crop_size=64, length=2, augment=False)
    with pytest.raises(ValueError, match=r"masks\[0\]"):
        CropDataset(images[:1], [masks[0][:10]], crop_size=64, length=2, augment=False)


def test_list_samples_relative_path_absolute(fnc_sample_dir, monkeypatch) -> None:
    monkeypatch.chdir(fnc_sample_dir.parent)
    samples = list_samples(Path(fnc_sample_dir.name), require_masks=True)

    assert len(samples) == 4
    for sample in samples:
        assert sample.image_path.is_absolute()
        assert sample.mask_path.is_absolute()
