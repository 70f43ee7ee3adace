"""Tests for ccflow.inference: tiling is exact for predictors with a known output."""

import numpy as np
import pytest
import torch
from torch import nn

from ccflow.inference import pad_to_multiple, predict_probability
from ccflow.model import CResUNet
from ccflow.postprocess import PostprocessConfig, count_cells, label_cells


class PointwiseNet(nn.Module):
    """Logit 12 * (mean of red and green - 0.4) per pixel. Records each input shape."""

    def __init__(self) -> None:
        super().__init__()
        self.input_shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input_shapes.append(tuple(x.shape))
        return 12.0 * (x[:, :2].mean(dim=1, keepdim=True) - 0.4)


class BoxFilterNet(nn.Module):
    """Logit 10 * (3x3 mean over all channels - 0.4), zero padding. Receptive field 3x3.

    ``multiple`` sets the ``input_multiple`` attribute that ccflow.model.input_multiple
    reads, so the test also covers padding and tile alignment.
    """

    def __init__(self, multiple: int | None = None) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 3, padding=1, bias=False)
        nn.init.constant_(self.conv.weight, 1.0 / 27.0)
        self.conv.weight.requires_grad_(False)
        if multiple is not None:
            self.input_multiple = multiple
        self.input_shapes: list[tuple[int, ...]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.input_shapes.append(tuple(x.shape))
        return 10.0 * (self.conv(x) - 0.4)


class BlockMeanNet(nn.Module):
    """Logit from the mean of each aligned 2x2 block, so only even shifts commute with it."""

    input_multiple = 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        block_means = nn.functional.avg_pool2d(x.mean(dim=1, keepdim=True), 2)
        return 10.0 * (nn.functional.interpolate(block_means, scale_factor=2.0, mode="nearest") - 0.4)


class TwoChannelNet(nn.Module):
    """Invalid predictor that returns two channels."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2]


def random_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((height, width, 3), dtype=np.float32)


def smooth_image(height: int, width: int) -> np.ndarray:
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    columns = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :]
    channel = 0.5 * (rows + columns)
    return np.repeat(channel[:, :, None], 3, axis=2)


def disc_image(height: int, width: int, centre: tuple[int, int], radius: float) -> np.ndarray:
    """Return a dark float image with one bright disc."""
    rows, columns = np.mgrid[:height, :width]
    inside = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2 <= radius**2
    image = np.full((height, width, 3), 0.05, dtype=np.float32)
    image[inside] = 0.9
    return image


def direct_probability(model: nn.Module, image: np.ndarray) -> np.ndarray:
    """Run the model once on the whole image, with no tiling or padding."""
    batch = torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))[None]
    with torch.no_grad():
        return torch.sigmoid(model(batch))[0, 0].numpy()


def test_pointwise_tiles_match_direct() -> None:
    image = random_image(150, 170)
    model = PointwiseNet()

    probability = predict_probability(model, image, tile_size=64, overlap=8, batch_size=4)

    # Stride 56: row starts 0, 56, 86 and column starts 0, 56, 106 give 9 tiles.
    assert [shape[0] for shape in model.input_shapes] == [4, 4, 1]
    assert all(shape[1:] == (3, 64, 64) for shape in model.input_shapes)
    assert probability.shape == (150, 170)
    assert probability.dtype == np.float32
    np.testing.assert_allclose(probability, direct_probability(model, image), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "height, width, tile_size, overlap, multiple",
    [
        (150, 170, 64, 4, None),
        (101, 77, 32, 2, None),
        (101, 77, 32, 8, 8),
        (200, 130, 48, 6, 8),
        (64, 300, 40, 10, 4),
    ],
)
def test_box_filter_tiles_match_untiled(
    height: int, width: int, tile_size: int, overlap: int, multiple: int | None
) -> None:
    image = random_image(height, width, seed=height + width)
    tiled_model = BoxFilterNet(multiple)
    untiled_model = BoxFilterNet(multiple)

    tiled = predict_probability(tiled_model, image, tile_size=tile_size, overlap=overlap)
    untiled = predict_probability(untiled_model, image, tile_size=max(height, width))

    assert len(untiled_model.input_shapes) == 1
    assert sum(shape[0] for shape in tiled_model.input_shapes) > 1
    if multiple is not None:
        for shape in tiled_model.input_shapes:
            assert shape[2] % multiple == 0, shape
            assert shape[3] % multiple == 0, shape
    np.testing.assert_allclose(tiled, untiled, rtol=0, atol=1e-6)


def test_box_filter_matches_direct_without_padding() -> None:
    image = random_image(96, 120)
    model = BoxFilterNet()

    probability = predict_probability(model, image, tile_size=40, overlap=4)

    np.testing.assert_allclose(probability, direct_probability(model, image), rtol=0, atol=1e-6)


def test_tile_starts_follow_pooling_grid() -> None:
    # overlap=9 would give an odd stride of 31. The stride is rounded down to 30, so
    # every tile pools the same 2x2 blocks as the untiled pass.
    image = random_image(101, 77)

    tiled = predict_probability(BlockMeanNet(), image, tile_size=40, overlap=9)
    untiled = predict_probability(BlockMeanNet(), image, tile_size=101)

    np.testing.assert_allclose(tiled, untiled, rtol=0, atol=1e-6)


def test_zero_overlap_leaves_seams() -> None:
    # Negative control: without overlap the zero padding of each tile edge shows up.
    image = random_image(96, 96)

    tiled = predict_probability(BoxFilterNet(), image, tile_size=32, overlap=0)
    untiled = predict_probability(BoxFilterNet(), image, tile_size=96)

    assert np.abs(tiled - untiled).max() > 1e-2


def test_disc_across_tile_border_counted_once() -> None:
    # Tiles of 64 with overlap 16 start at 0, 48, 96 and 136, so the kept regions meet
    # at rows and columns 56, 104 and 148. The disc straddles row 104 and column 56.
    image = disc_image(200, 200, centre=(104, 56), radius=18)
    model = BoxFilterNet()

    probability = predict_probability(model, image, tile_size=64, overlap=16)
    labels = label_cells(probability, PostprocessConfig())
    untiled = predict_probability(BoxFilterNet(), image, tile_size=200)

    assert sum(shape[0] for shape in model.input_shapes) == 16
    assert count_cells(labels) == 1
    assert labels[104, 56] == 1
    assert labels[104 - 15, 56] == labels[104 + 15, 56] == 1
    assert labels[104, 56 - 15] == labels[104, 56 + 15] == 1
    np.testing.assert_allclose(probability, untiled, rtol=0, atol=1e-6)


def test_scale_half_returns_original_size() -> None:
    image = smooth_image(90, 130)
    model = PointwiseNet()

    probability = predict_probability(model, image, scale=0.5)

    assert model.input_shapes == [(1, 3, 45, 65)]
    assert probability.shape == (90, 130)
    assert probability.dtype == np.float32
    assert probability.min() >= 0.0
    assert probability.max() <= 1.0
    # A pointwise function of a smooth ramp survives down- and upsampling closely.
    np.testing.assert_allclose(probability, direct_probability(model, image), rtol=0, atol=0.05)


def test_scale_two_returns_original_size() -> None:
    image = smooth_image(30, 41)
    model = PointwiseNet()

    probability = predict_probability(model, image, scale=2.0)

    assert model.input_shapes == [(1, 3, 60, 82)]
    assert probability.shape == (30, 41)


@pytest.mark.parametrize("height, width, tile_size", [(70, 90, 32), (37, 53, 512), (9, 200, 64)])
def test_c_resunet_non_multiple_sizes(height: int, width: int, tile_size: int) -> None:
    torch.manual_seed(0)
    model = CResUNet(base_width=4)

    probability = predict_probability(model, random_image(height, width), tile_size=tile_size, overlap=8)

    assert probability.shape == (height, width)
    assert probability.dtype == np.float32
    assert np.isfinite(probability).all()
    assert probability.min() >= 0.0
    assert probability.max() <= 1.0


def test_training_mode_restored() -> None:
    torch.manual_seed(0)
    model = CResUNet(base_width=4).train()
    running_mean = model.encoder_blocks[1].body[0][0].running_mean.clone()

    predict_probability(model, random_image(48, 48))

    assert model.training
    assert all(module.training for module in model.modules())
    # Eval mode during prediction leaves the BatchNorm statistics untouched.
    assert torch.equal(model.encoder_blocks[1].body[0][0].running_mean, running_mean)


def test_eval_mode_kept() -> None:
    model = CResUNet(base_width=4).eval()

    predict_probability(model, random_image(16, 16))

    assert not model.training


def test_output_is_deterministic() -> None:
    torch.manual_seed(0)
    model = CResUNet(base_width=4)
    image = random_image(40, 56)

    first = predict_probability(model, image, tile_size=24, overlap=8)
    second = predict_probability(model, image, tile_size=24, overlap=8)

    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    "image, match",
    [
        (np.zeros((8, 8, 3), dtype=np.uint8), "dtype uint8.*to_float"),
        (np.zeros((8, 8), dtype=np.float32), r"shape \(H, W, 3\)"),
        (np.zeros((8, 8, 4), dtype=np.float32), r"got shape \(8, 8, 4\)"),
        (np.full((8, 8, 3), 1.5, dtype=np.float32), r"in \[0, 1\], got range \[1.5, 1.5\]"),
        (np.full((8, 8, 3), np.nan, dtype=np.float32), "finite"),
    ],
)
def test_invalid_image_rejected(image: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        predict_probability(PointwiseNet(), image)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"scale": 0.0}, "scale must be a finite number above 0, got 0.0"),
        ({"scale": float("inf")}, "scale must be a finite number above 0, got inf"),
        ({"tile_size": 0}, "tile_size must be at least 1"),
        ({"tile_size": 16, "overlap": 16}, r"overlap must be in \[0, tile_size=16\), got 16"),
        ({"overlap": -1}, "got -1"),
        ({"batch_size": 0}, "batch_size must be at least 1, got 0"),
    ],
)
def test_invalid_options_rejected(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        predict_probability(PointwiseNet(), random_image(40, 40), **options)


def test_tile_too_small_for_model() -> None:
    model = CResUNet(base_width=4)

    with pytest.raises(ValueError, match="tile_size=12 with overlap=4 is too small"):
        predict_probability(model, random_image(40, 40), tile_size=12, overlap=4)


def test_wrong_output_shape_rejected() -> None:
    with pytest.raises(ValueError, match="one logit per pixel"):
        predict_probability(TwoChannelNet(), random_image(16, 16))


def test_pad_to_multiple_reflects() -> None:
    image = random_image(5, 7)

    padded = pad_to_multiple(image, 4)

    assert padded.shape == (8, 8, 3)
    np.testing.assert_array_equal(padded[:5, :7], image)
    np.testing.assert_array_equal(padded[5, :7], image[3])
    np.testing.assert_array_equal(padded[:5, 7], image[:, 5])
    assert pad_to_multiple(padded, 4) is padded
