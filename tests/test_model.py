"""Tests for ccflow.model: c-ResUnet shape and size, smp models, build_model errors."""

import socket

import pytest
import torch
from torch import nn

from ccflow.model import (
    ARCHITECTURES,
    CResUNet,
    build_model,
    count_parameters,
    input_multiple,
)

# Exact parameter count of CResUNet(base_width=16); the published model has about 1.7 M.
FULL_WIDTH_PARAMETERS = 1_718_149


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make every socket connection fail, so a test proves that nothing is downloaded."""

    def refuse_connection(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"unexpected network connection to {args[1:]!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse_connection)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse_connection)
    monkeypatch.setattr(socket, "create_connection", refuse_connection)


@pytest.mark.parametrize("height, width", [(8, 8), (32, 48), (64, 24), (40, 72)])
def test_c_resunet_output_shape(height: int, width: int) -> None:
    torch.manual_seed(0)
    model = CResUNet(base_width=4).eval()

    with torch.no_grad():
        logits = model(torch.rand(2, 3, height, width))

    assert logits.shape == (2, 1, height, width)
    assert logits.dtype == torch.float32
    assert torch.isfinite(logits).all()


def test_c_resunet_rejects_non_multiple_of_8() -> None:
    model = CResUNet(base_width=4)

    with pytest.raises(ValueError, match="30x32 is not a multiple of 8"):
        model(torch.rand(1, 3, 30, 32))


def test_full_width_parameter_count() -> None:
    count = count_parameters(CResUNet(base_width=16))

    assert 1_600_000 <= count <= 1_800_000
    assert count == FULL_WIDTH_PARAMETERS


def test_base_width_scales_parameters() -> None:
    counts = {width: count_parameters(CResUNet(base_width=width)) for width in (4, 8, 16)}

    assert counts[4] < counts[8] < counts[16]
    # Convolution weights grow with the square of the width, so width 4 is about 1/16.
    assert counts[4] < counts[16] / 10


def test_build_model_c_resunet() -> None:
    model = build_model("c-resunet", base_width=4)

    assert isinstance(model, CResUNet)
    assert model.base_width == 4
    assert input_multiple(model) == 8


def test_build_model_default_is_full_width() -> None:
    model = build_model()

    assert isinstance(model, CResUNet)
    assert count_parameters(model) == FULL_WIDTH_PARAMETERS


@pytest.mark.parametrize("arch", ["unet-resnet18", "fpn-resnet18"])
def test_build_smp_model_offline(arch: str, no_network: None) -> None:
    torch.manual_seed(0)
    model = build_model(arch).eval()

    with torch.no_grad():
        logits = model(torch.rand(1, 3, 64, 96))

    assert arch in ARCHITECTURES
    assert logits.shape == (1, 1, 64, 96)
    assert input_multiple(model) == 32


def test_build_model_other_smp_pattern(no_network: None) -> None:
    model = build_model("linknet-resnet18")

    assert type(model).__name__ == "Linknet"
    assert input_multiple(model) == 32


@pytest.mark.parametrize("arch", ["resunet", "unet", "unet-nosuchencoder", "nosucharch-resnet18", ""])
def test_build_model_invalid_arch(arch: str) -> None:
    with pytest.raises(ValueError) as error:
        build_model(arch)

    message = str(error.value)
    assert repr(arch) in message
    for choice in ARCHITECTURES:
        assert choice in message


def test_invalid_base_width() -> None:
    with pytest.raises(ValueError, match="base_width must be at least 1, got 0"):
        build_model("c-resunet", base_width=0)


def test_input_multiple_of_other_modules() -> None:
    plain = nn.Conv2d(3, 1, 1)
    declared = nn.Conv2d(3, 1, 1)
    declared.input_multiple = 16

    assert input_multiple(plain) == 1
    assert input_multiple(declared) == 16


def test_count_parameters_includes_frozen() -> None:
    layer = nn.Conv2d(3, 2, 3)
    layer.weight.requires_grad_(False)

    assert count_parameters(layer) == 3 * 2 * 3 * 3 + 2


def test_backward_pass_reaches_all_parameters() -> None:
    torch.manual_seed(0)
    model = CResUNet(base_width=4).train()
    images = torch.rand(2, 3, 32, 32)
    targets = (torch.rand(2, 1, 32, 32) > 0.7).float()

    loss = nn.functional.binary_cross_entropy_with_logits(model(images), targets)
    loss.backward()

    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name
    assert model.colour_space.weight.grad.abs().sum() > 0


def test_training_steps_reduce_loss() -> None:
    torch.manual_seed(0)
    model = CResUNet(base_width=4).train()
    images = torch.rand(2, 3, 32, 32)
    targets = (images.mean(dim=1, keepdim=True) > 0.5).float()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    losses = []
    for _ in range(10):
        optimizer.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(images), targets)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    assert losses[-1] < 0.8 * losses[0]
