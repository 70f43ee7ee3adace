"""Tests for ccflow.explain: Grad-CAM heatmaps of tiny models and overlay rendering."""

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.segmentation import find_boundaries
from torch import nn

from ccflow.data import read_image, read_mask, to_float
from ccflow.explain import OUTLINE_RGB, default_target_layer, gradcam_heatmap, render_overlay
from ccflow.inference import predict_probability
from ccflow.metrics import label_mask
from ccflow.model import CResUNet, build_model


def blob_image(height: int = 64, width: int = 64) -> np.ndarray:
    """Return a dark float image with one bright disc of radius 10 at (30, 36)."""
    rows, columns = np.mgrid[:height, :width]
    image = np.full((height, width, 3), 0.05, dtype=np.float32)
    image[(rows - 30) ** 2 + (columns - 36) ** 2 <= 100] = 0.9
    return image


@pytest.fixture(scope="module")
def smp_unet() -> nn.Module:
    torch.manual_seed(0)
    return build_model("unet-resnet18")


def tiny_model(seed: int = 0) -> CResUNet:
    torch.manual_seed(seed)
    return CResUNet(base_width=4)


def record_input_shapes(model: nn.Module) -> list[tuple[int, ...]]:
    """Record the shape of every input the model receives from now on."""
    shapes: list[tuple[int, ...]] = []
    model.register_forward_pre_hook(lambda module, inputs: shapes.append(tuple(inputs[0].shape)))
    return shapes


def assert_valid_heatmap(heatmap: np.ndarray, shape: tuple[int, int]) -> None:
    assert heatmap.shape == shape
    assert heatmap.dtype == np.float32
    assert np.isfinite(heatmap).all()
    assert heatmap.min() >= 0.0
    assert heatmap.max() == pytest.approx(1.0)
    assert heatmap.std() > 0.01
    assert len(np.unique(heatmap)) > 10


class ZeroCamNet(nn.Module):
    """Model whose Grad-CAM at ``features`` is zero: constant activations, negative weights."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Conv2d(3, 2, 1)
        self.head = nn.Conv2d(2, 1, 1)
        with torch.no_grad():
            self.features.weight.zero_()
            self.features.bias.fill_(1.0)
            self.head.weight.fill_(-1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class UnusedLayerNet(nn.Module):
    """Model with a submodule that the forward pass never runs."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Conv2d(3, 1, 1)
        self.unused = nn.Conv2d(3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.used(x)


def test_heatmap_of_tiny_model_on_blob() -> None:
    heatmap = gradcam_heatmap(tiny_model(), blob_image())

    assert_valid_heatmap(heatmap, (64, 64))


def test_heatmap_with_bottleneck_target() -> None:
    model = tiny_model(seed=2)

    heatmap = gradcam_heatmap(model, blob_image(), target_layer=model.bottleneck)

    assert_valid_heatmap(heatmap, (64, 64))


def test_heatmap_of_smp_unet(smp_unet: nn.Module) -> None:
    heatmap = gradcam_heatmap(smp_unet, blob_image(48, 80))

    assert_valid_heatmap(heatmap, (48, 80))


@pytest.mark.parametrize("head_bias", [10.0, -10.0])
def test_heatmap_with_all_or_no_foreground(head_bias: float) -> None:
    model = tiny_model()
    with torch.no_grad():
        model.head.bias.fill_(head_bias)

    heatmap = gradcam_heatmap(model, blob_image())

    assert_valid_heatmap(heatmap, (64, 64))


def test_zero_heatmap_returned_with_warning(caplog: pytest.LogCaptureFixture) -> None:
    model = ZeroCamNet()

    with caplog.at_level(logging.WARNING, logger="ccflow.explain"):
        heatmap = gradcam_heatmap(model, blob_image(20, 30), target_layer=model.features)

    assert heatmap.shape == (20, 30)
    assert heatmap.dtype == np.float32
    assert not heatmap.any()
    assert "zero everywhere" in caplog.text


def test_max_side_caps_network_size() -> None:
    model = tiny_model()
    shapes = record_input_shapes(model)

    heatmap = gradcam_heatmap(model, blob_image(100, 200), max_side=64)

    # 100x200 shrinks to 32x64, already a multiple of 8.
    assert shapes
    assert all(shape == (1, 3, 32, 64) for shape in shapes)
    assert heatmap.shape == (100, 200)


def test_scale_and_padding_applied() -> None:
    model = tiny_model()
    shapes = record_input_shapes(model)

    heatmap = gradcam_heatmap(model, blob_image(60, 90), scale=0.5)

    # 60x90 at scale 0.5 is 30x45, padded to 32x48.
    assert all(shape == (1, 3, 32, 48) for shape in shapes)
    assert heatmap.shape == (60, 90)


def test_training_mode_and_gradients_restored() -> None:
    model = tiny_model().train()
    running_mean = model.bottleneck[0].body[0][0].running_mean.clone()

    gradcam_heatmap(model, blob_image())

    assert model.training
    assert all(module.training for module in model.modules())
    assert all(parameter.grad is None for parameter in model.parameters())
    assert torch.equal(model.bottleneck[0].body[0][0].running_mean, running_mean)


def test_frozen_model_still_explained() -> None:
    model = tiny_model()
    model.requires_grad_(False)

    heatmap = gradcam_heatmap(model, blob_image())

    assert_valid_heatmap(heatmap, (64, 64))


def test_runs_under_inference_mode() -> None:
    model = tiny_model()

    with torch.inference_mode():
        heatmap = gradcam_heatmap(model, blob_image())

    assert_valid_heatmap(heatmap, (64, 64))


def test_target_layer_outside_model_rejected() -> None:
    with pytest.raises(ValueError, match="not a submodule of the model"):
        gradcam_heatmap(tiny_model(), blob_image(), target_layer=nn.Conv2d(3, 1, 1))


def test_target_layer_not_run_rejected() -> None:
    model = UnusedLayerNet()

    with pytest.raises(ValueError, match="did not return a tensor"):
        gradcam_heatmap(model, blob_image(16, 16), target_layer=model.unused)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"scale": -1.0}, "scale must be a finite number above 0, got -1.0"),
        ({"max_side": 0}, "max_side must be at least 1 network pixel, got 0"),
    ],
)
def test_invalid_heatmap_options_rejected(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        gradcam_heatmap(tiny_model(), blob_image(16, 16), **options)


def test_default_target_layers(smp_unet: nn.Module) -> None:
    c_resunet = tiny_model()
    fpn = build_model("fpn-resnet18")

    assert default_target_layer(c_resunet) is c_resunet.decoder_levels[-2]
    assert default_target_layer(smp_unet) is smp_unet.decoder.blocks[-2]
    assert default_target_layer(fpn) is fpn.decoder
    with pytest.raises(ValueError, match="Pass target_layer"):
        default_target_layer(nn.Conv2d(3, 1, 1))


def two_square_labels(height: int = 40, width: int = 50) -> np.ndarray:
    labels = np.zeros((height, width), dtype=np.int32)
    labels[5:15, 5:15] = 1
    labels[20:35, 25:45] = 2
    return labels


def test_overlay_draws_outlines_only() -> None:
    image = np.random.default_rng(0).random((40, 50, 3), dtype=np.float32)
    labels = two_square_labels()

    overlay = render_overlay(image, labels)

    outlines = find_boundaries(labels, mode="thick")
    assert overlay.shape == (40, 50, 3)
    assert overlay.dtype == np.uint8
    assert outlines.sum() > 0
    assert (overlay[outlines] == OUTLINE_RGB).all()
    np.testing.assert_array_equal(overlay[~outlines], np.round(image[~outlines] * 255).astype(np.uint8))
    # Both sides of each cell border are drawn: the cell's edge pixel and the one outside.
    assert outlines[5, 10]
    assert outlines[4, 10]
    assert outlines[34, 30]
    assert outlines[35, 30]


def test_overlay_blends_heatmap() -> None:
    image = np.full((40, 50, 3), 0.2, dtype=np.float32)
    labels = two_square_labels()
    heatmap = np.tile(np.linspace(0.0, 1.0, 50, dtype=np.float32), (40, 1))
    outlines = find_boundaries(labels, mode="thick")

    plain = render_overlay(image, labels)
    blended = render_overlay(image, labels, heatmap, alpha=0.5)
    transparent = render_overlay(image, labels, heatmap, alpha=0.0)

    assert (blended[outlines] == OUTLINE_RGB).all()
    assert (blended[~outlines] != plain[~outlines]).any(axis=-1).all()
    # The jet colormap runs from blue at 0 to red at 1.
    assert blended[0, 0, 2] > blended[0, 0, 0]
    assert blended[0, 49, 0] > blended[0, 49, 2]
    np.testing.assert_array_equal(transparent, plain)


@pytest.mark.parametrize("dtype, maximum", [(np.uint8, 255), (np.uint16, 65535)])
def test_overlay_accepts_raw_images(dtype: type, maximum: int) -> None:
    raw = np.random.default_rng(1).integers(0, maximum + 1, size=(40, 50, 3)).astype(dtype)
    labels = two_square_labels()

    from_raw = render_overlay(raw, labels)
    from_float = render_overlay(raw.astype(np.float32) / maximum, labels)

    np.testing.assert_array_equal(from_raw, from_float)


@pytest.mark.parametrize(
    "labels, heatmap, alpha, match",
    [
        (np.zeros((40, 51), dtype=np.int32), None, 0.35, "labels shape"),
        (np.zeros((40, 50), dtype=np.float32), None, 0.35, "integer label image"),
        (np.zeros((40, 50), dtype=np.int32), np.full((40, 50), 1.5), 0.35, r"heatmap values must lie in \[0, 1\]"),
        (np.zeros((40, 50), dtype=np.int32), np.zeros((10, 10)), 0.35, "heatmap shape"),
        (np.zeros((40, 50), dtype=np.int32), None, 1.5, r"alpha must be in \[0, 1\], got 1.5"),
    ],
)
def test_overlay_invalid_inputs_rejected(
    labels: np.ndarray, heatmap: np.ndarray | None, alpha: float, match: str
) -> None:
    image = np.zeros((40, 50, 3), dtype=np.float32)

    with pytest.raises(ValueError, match=match):
        render_overlay(image, labels, heatmap, alpha=alpha)


def test_pipeline_on_full_size_fnc_image(fnc_sample_dir: Path) -> None:
    image_path = sorted((fnc_sample_dir / "images").glob("*.png"))[0]
    mask_path = fnc_sample_dir / "masks" / image_path.name
    image = to_float(read_image(image_path))
    labels = label_mask(read_mask(mask_path))
    model = tiny_model()
    shapes = record_input_shapes(model)

    probability = predict_probability(model, image, scale=0.5)
    prediction_shapes = list(shapes)
    shapes.clear()
    heatmap = gradcam_heatmap(model, image, max_side=512)
    overlay = render_overlay(image, labels, heatmap)

    assert image.shape == (1200, 1600, 3)
    assert probability.shape == (1200, 1600)
    # At scale 0.5 the network image is 600x800, larger than the 512 tile side, so it
    # runs as 512x512 tiles.
    assert all(shape[2:] == (512, 512) for shape in prediction_shapes)
    # max_side=512 caps the Grad-CAM input at 384x512.
    assert all(shape == (1, 3, 384, 512) for shape in shapes)
    assert_valid_heatmap(heatmap, (1200, 1600))
    assert overlay.shape == (1200, 1600, 3)
    assert overlay.dtype == np.uint8
    assert labels.max() > 0
    assert (overlay[find_boundaries(labels, mode="thick")] == OUTLINE_RGB).all()
