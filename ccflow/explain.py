"""Grad-CAM heatmaps of the foreground logit and overlays that show them with cell outlines."""

from __future__ import annotations

import logging
import math

import cv2
import numpy as np
import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import SemanticSegmentationTarget
from skimage.segmentation import find_boundaries
from torch import nn

from ccflow.data import resample_image, resize_image, to_float
from ccflow.inference import pad_to_multiple, validate_float_image
from ccflow.model import CResUNet, input_multiple

logger = logging.getLogger(__name__)

# Magenta does not occur in the jet colormap nor in yellow-to-orange cells on a dark
# background, so outlines stay visible on both.
OUTLINE_RGB: tuple[int, int, int] = (255, 0, 255)


def default_target_layer(model: nn.Module) -> nn.Module:
    """Return the layer whose activations Grad-CAM weights by default.

    Parameters
    ----------
    model : torch.nn.Module
        A :class:`ccflow.model.CResUNet` or an smp segmentation model.

    Returns
    -------
    torch.nn.Module
        The second-to-last decoder level of a c-ResUnet (half resolution), or the
        second-to-last block of an smp decoder that has ``blocks`` (U-Net family), else
        the whole smp decoder.

    Notes
    -----
    The last decoder level feeds a 1x1 head, so Grad-CAM there only redraws the predicted
    probability map. One level up, the heatmap also shows the surrounding evidence the
    network used, at half the resolution.

    Raises
    ------
    ValueError
        If the model is neither of these, so the caller has to pass a target layer.
    """
    if isinstance(model, CResUNet):
        return model.decoder_levels[-2]
    decoder = getattr(model, "decoder", None)
    if isinstance(decoder, nn.Module):
        blocks = getattr(decoder, "blocks", None)
        if isinstance(blocks, (nn.ModuleList, nn.Sequential)) and len(blocks) > 1:
            return blocks[-2]
        return decoder
    raise ValueError(
        f"cannot choose a Grad-CAM target layer for a {type(model).__name__}, which has no "
        "decoder. Pass target_layer, for example the last convolution before the head."
    )


def _foreground_mask(
    model: nn.Module, input_tensor: torch.Tensor, layer: nn.Module, height: int, width: int
) -> np.ndarray:
    """Return a float32 mask of pixels with a positive logit inside the unpadded region.

    The whole unpadded region is returned when no pixel is predicted as foreground, so
    Grad-CAM then explains the logit summed over the image. Raises ValueError when the
    forward pass does not run ``layer``, whose output Grad-CAM needs.
    """
    layer_outputs: list[object] = []
    handle = layer.register_forward_hook(lambda module, inputs, output: layer_outputs.append(output))
    try:
        with torch.no_grad():
            logits = model(input_tensor.detach())
    finally:
        handle.remove()
    if not layer_outputs or not all(isinstance(output, torch.Tensor) for output in layer_outputs):
        raise ValueError(
            f"target_layer {type(layer).__name__} did not return a tensor in the model's forward "
            "pass. Pass a layer that the forward pass runs and that returns one tensor."
        )

    foreground = (logits[0, 0] > 0).cpu().numpy()
    mask = np.zeros(foreground.shape, dtype=np.float32)
    mask[:height, :width] = foreground[:height, :width]
    if not mask.any():
        logger.debug("No foreground predicted, so Grad-CAM targets the whole image")
        mask[:height, :width] = 1.0
    return mask


def gradcam_heatmap(
    model: nn.Module,
    image: np.ndarray,
    *,
    scale: float = 1.0,
    max_side: int = 1024,
    target_layer: nn.Module | None = None,
) -> np.ndarray:
    """Compute a Grad-CAM heatmap of the model's foreground logit.

    The image is resampled by ``scale``, or further so that its longer side is at most
    ``max_side`` network pixels, then padded by reflection to
    :func:`ccflow.model.input_multiple`. Grad-CAM (``pytorch_grad_cam.GradCAM``)
    weights the activations of ``target_layer`` by their mean gradient with respect to
    the logit summed over the pixels predicted as cells (logit > 0), or over all pixels
    when none is. The map is cropped to the unpadded region, resized back to the
    original size and divided by its maximum.

    Parameters
    ----------
    model : torch.nn.Module
        Takes float32 (N, 3, h, w), returns logits (N, 1, h, w). It runs in eval mode on
        the device of its parameters. Its training mode is restored and its parameter
        gradients are set to None afterwards.
    image : numpy.ndarray
        float (H, W, 3) in [0, 1], channels last.
    scale : float
        Network pixels per original pixel, as used in training.
    max_side : int
        Maximum longer side of the network image in pixels. It bounds the time and
        memory of the forward and backward pass.
    target_layer : torch.nn.Module, optional
        Layer whose output Grad-CAM explains. Defaults to
        :func:`default_target_layer`.

    Returns
    -------
    numpy.ndarray
        float32 (H, W) heatmap in [0, 1] with maximum 1. It is 0 everywhere, with a
        logged warning, when no pixel has a positive gradient-weighted activation, or
        all pixels have the same one. An untrained model or an image without cells can
        give such a map.

    Raises
    ------
    ValueError
        If the image or a parameter is invalid, or the forward pass does not run
        ``target_layer``.
    RuntimeError
        If Grad-CAM returned no map, a map of the wrong shape or non-finite values.

    Notes
    -----
    With a 1x1 convolution head, as in c-ResUnet, the Grad-CAM map of the last decoder
    level is ReLU(logit - head bias) rescaled to [0, 1], so it mostly redraws the
    prediction. That is why the default target is one level up. Pass
    ``target_layer=model.bottleneck`` for a coarse map, at 1/8 resolution, of the context
    that raised the foreground logit.
    """
    image = validate_float_image(image)
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a finite number above 0, got {scale}")
    if max_side < 1:
        raise ValueError(f"max_side must be at least 1 network pixel, got {max_side}")
    layer = default_target_layer(model) if target_layer is None else target_layer
    if not any(module is layer for module in model.modules()):
        raise ValueError(
            f"target_layer {type(layer).__name__} is not a submodule of the model. Pass one of "
            "model.modules(), or None for the default."
        )

    height, width = image.shape[:2]
    effective_scale = min(scale, max_side / max(height, width))
    network_image = image if effective_scale == 1.0 else resample_image(image, effective_scale)
    network_height, network_width = network_image.shape[:2]
    padded = pad_to_multiple(network_image.astype(np.float32, copy=False), input_multiple(model))
    logger.debug(
        "Grad-CAM on %dx%d network image (scale %.4g) padded to %dx%d",
        network_height, network_width, effective_scale, padded.shape[0], padded.shape[1],
    )

    parameter = next(model.parameters(), None)
    device = torch.device("cpu") if parameter is None else parameter.device
    chw = np.ascontiguousarray(padded.transpose(2, 0, 1))[None]

    was_training = model.training
    model.eval()
    grayscale = None
    try:
        # Grad-CAM needs autograd even when the caller runs under inference_mode or
        # no_grad. The input is created here so that it is a normal tensor.
        with torch.inference_mode(False), torch.enable_grad():
            # The input requires a gradient so that the target layer's output does too,
            # even when the model's parameters are frozen.
            input_tensor = torch.from_numpy(chw).to(device).requires_grad_(True)
            mask = _foreground_mask(model, input_tensor, layer, network_height, network_width)
            # GradCAM is used without its context manager because BaseCAM.__exit__ in
            # grad-cam 1.5.7 suppresses IndexError, which would hide a failed run.
            cam = GradCAM(model=model, target_layers=[layer])
            try:
                grayscale = cam(input_tensor=input_tensor, targets=[SemanticSegmentationTarget(0, mask)])
            finally:
                cam.activations_and_grads.release()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)

    if not isinstance(grayscale, np.ndarray) or grayscale.shape != (1,) + padded.shape[:2]:
        shape = getattr(grayscale, "shape", None)
        raise RuntimeError(
            f"Grad-CAM returned {type(grayscale).__name__} of shape {shape}, expected an array of "
            f"shape {(1,) + padded.shape[:2]}. Check that the model's forward pass runs target_layer."
        )
    heatmap = grayscale[0, :network_height, :network_width].astype(np.float32)
    if not np.isfinite(heatmap).all():
        raise RuntimeError(
            f"Grad-CAM heatmap for target layer {type(layer).__name__} contains non-finite "
            "values. Check the model's output for NaN or infinity on this image."
        )
    if float(heatmap.max()) <= 0.0:
        # A valid outcome, so it does not raise: the gradient-weighted activations are
        # nowhere positive, or the same everywhere, and pytorch_grad_cam maps both to 0.
        logger.warning(
            "Grad-CAM heatmap for target layer %s is zero everywhere on this %dx%d image",
            type(layer).__name__, height, width,
        )
        return np.zeros((height, width), dtype=np.float32)
    # Normalise after resizing, because area averaging lowers a narrow peak.
    heatmap = resize_image(heatmap, (height, width))
    heatmap = heatmap / heatmap.max()
    return np.clip(heatmap, 0.0, 1.0, out=heatmap)


def render_overlay(
    image: np.ndarray,
    labels: np.ndarray,
    heatmap: np.ndarray | None = None,
    *,
    alpha: float = 0.35,
) -> np.ndarray:
    """Draw cell outlines, and optionally a heatmap, over an image.

    Parameters
    ----------
    image : numpy.ndarray
        (H, W, 3) float in [0, 1], or raw uint8 or uint16.
    labels : numpy.ndarray
        Integer label image (H, W), 0 = background, 1..N = cells.
    heatmap : numpy.ndarray, optional
        float (H, W) in [0, 1], drawn with the jet colormap (blue low, red high).
    alpha : float
        Weight of the heatmap colours in the blend, in [0, 1].

    Returns
    -------
    numpy.ndarray
        uint8 RGB (H, W, 3). Outline pixels, 2 px wide across each cell border
        (``skimage.segmentation.find_boundaries`` mode "thick"), are :data:`OUTLINE_RGB`.

    Raises
    ------
    ValueError
        If shapes do not match, a value range is wrong or ``labels`` is not integer.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if isinstance(image, np.ndarray) and np.issubdtype(image.dtype, np.floating):
        base = validate_float_image(image)
    else:
        base = to_float(image)
    height, width = base.shape[:2]

    labels = np.asarray(labels)
    if labels.shape != (height, width):
        raise ValueError(f"labels shape {labels.shape} does not match image size {(height, width)}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer label image, got dtype {labels.dtype}")

    if heatmap is not None:
        heatmap = np.asarray(heatmap)
        if heatmap.shape != (height, width):
            raise ValueError(f"heatmap shape {heatmap.shape} does not match image size {(height, width)}")
        if not (float(heatmap.min()) >= 0.0 and float(heatmap.max()) <= 1.0):
            raise ValueError(
                f"heatmap values must lie in [0, 1], got range [{heatmap.min()}, {heatmap.max()}]"
            )
        heat_uint8 = np.round(heatmap * 255.0).astype(np.uint8)
        colours_bgr = cv2.applyColorMap(heat_uint8, cv2.COLORMAP_JET)
        colours = cv2.cvtColor(colours_bgr, cv2.COLOR_BGR2RGB).astype(np.float32) / 255.0
        base = (1.0 - alpha) * base + alpha * colours

    overlay = np.round(np.clip(base, 0.0, 1.0) * 255.0).astype(np.uint8)
    outlines = find_boundaries(labels, mode="thick")
    overlay[outlines] = OUTLINE_RGB
    return overlay
