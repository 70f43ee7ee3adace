"""Segmentation networks that map an RGB image to one foreground logit per pixel.

Every model takes float32 input of shape (N, 3, H, W) with values in [0, 1] and returns
logits of shape (N, 1, H, W). H and W must be multiples of :func:`input_multiple`.
"""

from __future__ import annotations

import logging

import segmentation_models_pytorch as smp
import torch
from torch import nn

logger = logging.getLogger(__name__)

C_RESUNET = "c-resunet"

# Architectures that the test suite builds. build_model also accepts any other
# "<smp architecture>-<smp encoder>" name, for example "unetplusplus-resnet34".
ARCHITECTURES: tuple[str, ...] = (C_RESUNET, "unet-resnet18", "unet-resnet34", "fpn-resnet18")


class _PreActivationConv(nn.Sequential):
    """BatchNorm, ELU, then a same-padded convolution (pre-activation order)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ELU(inplace=True),
            nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2),
        )


class _PlainBlock(nn.Module):
    """Two 3x3 convolutions with BatchNorm and ELU between them, no shortcut."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.body = _PreActivationConv(out_channels, out_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.conv(x))


class _ResidualBlock(nn.Module):
    """Two pre-activation convolutions added to a shortcut of the input.

    The shortcut is a 1x1 convolution when the channel count changes and the identity
    otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _PreActivationConv(in_channels, out_channels, kernel_size),
            _PreActivationConv(out_channels, out_channels, kernel_size),
        )
        if in_channels == out_channels:
            self.shortcut: nn.Module = nn.Identity()
        else:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.body(x)


class _DecoderLevel(nn.Module):
    """Transposed-convolution upsampling by 2, concatenation with the skip, residual block."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.upsample = nn.ConvTranspose2d(in_channels, out_channels, 2, stride=2)
        self.block = _ResidualBlock(2 * out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        upsampled = self.upsample(x)
        return self.block(torch.cat([upsampled, skip], dim=1))


class CResUNet(nn.Module):
    """c-ResUnet, the cell-counting U-Net of Morelli et al., Scientific Reports 2021.

    A 1x1 convolution first maps RGB to one learned colour-space channel. The encoder has
    three levels at full, 1/2 and 1/4 resolution: a plain block of two 3x3 convolutions
    with ``base_width`` channels, then residual blocks with 2x and 4x ``base_width``
    channels and 1x1 convolution shortcuts. Each level ends in a 2x2 max-pool. The
    bottleneck at 1/8 resolution has two residual blocks of 8x ``base_width`` channels
    with 5x5 kernels. Each decoder level upsamples with a 2x2 transposed convolution,
    concatenates the encoder output of the same resolution and applies a residual block.
    A 1x1 convolution returns one logit per pixel. Convolutions inside blocks use the
    pre-activation order BatchNorm, ELU, convolution.

    Parameters
    ----------
    in_channels : int
        Number of input channels, 3 for RGB.
    base_width : int
        Channel count of the first level. 16 gives 1,718,149 parameters, the published
        size of about 1.7 M. Smaller widths give fast test models.

    Notes
    -----
    Paper: doi:10.1038/s41598-021-01929-5. Input height and width must be multiples of
    :attr:`input_multiple` (8), because of the three 2x2 max-pools.
    """

    input_multiple: int = 8
    """Height and width of the input must be multiples of this number."""

    def __init__(self, in_channels: int = 3, base_width: int = 16) -> None:
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be at least 1, got {in_channels}")
        if base_width < 1:
            raise ValueError(f"base_width must be at least 1, got {base_width}. The published model uses 16.")
        self.in_channels = in_channels
        self.base_width = base_width
        widths = (base_width, 2 * base_width, 4 * base_width, 8 * base_width)

        self.colour_space = nn.Conv2d(in_channels, 1, 1)
        self.encoder_blocks = nn.ModuleList(
            [
                _PlainBlock(1, widths[0]),
                _ResidualBlock(widths[0], widths[1]),
                _ResidualBlock(widths[1], widths[2]),
            ]
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = nn.Sequential(
            _ResidualBlock(widths[2], widths[3], kernel_size=5),
            _ResidualBlock(widths[3], widths[3], kernel_size=5),
        )
        # Ordered from the coarsest level to full resolution, so the last entry is the
        # default Grad-CAM target layer.
        self.decoder_levels = nn.ModuleList(
            [
                _DecoderLevel(widths[3], widths[2]),
                _DecoderLevel(widths[2], widths[1]),
                _DecoderLevel(widths[1], widths[0]),
            ]
        )
        self.head = nn.Conv2d(widths[0], 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute foreground logits.

        Parameters
        ----------
        x : torch.Tensor
            float32, shape (N, in_channels, H, W), H and W multiples of 8.

        Returns
        -------
        torch.Tensor
            float32 logits, shape (N, 1, H, W).
        """
        height, width = x.shape[-2:]
        if height % self.input_multiple or width % self.input_multiple:
            raise ValueError(
                f"CResUNet input size {height}x{width} is not a multiple of {self.input_multiple}. "
                "Pad the input, or use ccflow.inference.predict_probability, which pads it."
            )
        features = self.colour_space(x)
        skips = []
        for block in self.encoder_blocks:
            features = block(features)
            skips.append(features)
            features = self.pool(features)
        features = self.bottleneck(features)
        for level, skip in zip(self.decoder_levels, reversed(skips)):
            features = level(features, skip)
        return self.head(features)


def _split_smp_name(arch: str) -> tuple[str, str] | None:
    """Split "<architecture>-<encoder>" into smp names, or return None if smp lacks either."""
    architecture, separator, encoder = arch.partition("-")
    if not separator:
        return None
    if architecture not in smp.MODEL_ARCHITECTURES_MAPPING:
        return None
    if encoder not in smp.encoders.get_encoder_names():
        return None
    return architecture, encoder


def build_model(arch: str = C_RESUNET, base_width: int = 16) -> nn.Module:
    """Build an untrained segmentation model with one output logit.

    Parameters
    ----------
    arch : str
        ``"c-resunet"`` or ``"<smp architecture>-<smp encoder>"`` such as
        ``"unet-resnet18"``, ``"unet-resnet34"`` or ``"fpn-resnet18"``. smp models are
        built with ``encoder_weights=None``, so nothing is downloaded.
    base_width : int
        Channel count of the first c-ResUnet level. Ignored by smp models.

    Returns
    -------
    torch.nn.Module
        Model taking float32 (N, 3, H, W) and returning logits (N, 1, H, W).

    Raises
    ------
    ValueError
        If ``arch`` names no known architecture, or ``base_width`` is below 1.
    """
    if arch == C_RESUNET:
        return CResUNet(in_channels=3, base_width=base_width)

    smp_names = _split_smp_name(arch)
    if smp_names is None:
        raise ValueError(
            f"unknown arch {arch!r}. Choose one of {', '.join(ARCHITECTURES)}, or "
            f"'<architecture>-<encoder>' with an architecture from "
            f"{', '.join(sorted(smp.MODEL_ARCHITECTURES_MAPPING))} and an encoder from "
            "segmentation_models_pytorch.encoders.get_encoder_names()"
        )
    architecture, encoder = smp_names
    logger.debug("Building smp model %s with encoder %s and no pretrained weights", architecture, encoder)
    return smp.create_model(architecture, encoder_name=encoder, encoder_weights=None, in_channels=3, classes=1)


def input_multiple(model: nn.Module) -> int:
    """Return the number that the model's input height and width must be multiples of.

    Parameters
    ----------
    model : torch.nn.Module
        A c-ResUnet (8), an smp model (its encoder's output stride, 32 for encoders of
        depth 5), or any module with an integer ``input_multiple`` attribute.

    Returns
    -------
    int
        Required multiple in pixels. It is 1 for other modules, which accept any size.
    """
    declared = getattr(model, "input_multiple", None)
    if isinstance(declared, int) and declared >= 1:
        return declared
    encoder = getattr(model, "encoder", None)
    output_stride = getattr(encoder, "output_stride", None)
    if isinstance(output_stride, int) and output_stride >= 1:
        return output_stride
    return 1


def count_parameters(model: nn.Module) -> int:
    """Return the number of parameters of the model, trainable or not, without buffers."""
    return sum(parameter.numel() for parameter in model.parameters())
