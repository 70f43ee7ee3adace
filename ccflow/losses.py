"""Training losses for one-logit binary segmentation.

Every loss takes logits of shape (N, 1, H, W) and float targets of the same shape with
values 0 (background) or 1 (cell), and returns a scalar tensor.
"""

from __future__ import annotations

import logging

import torch
from segmentation_models_pytorch import losses as smp_losses
from torch import nn

logger = logging.getLogger(__name__)

LOSSES: tuple[str, ...] = ("dice", "focal", "focal_tversky", "tversky", "bce")

# In segmentation_models_pytorch 0.6.0, TverskyLoss's ``alpha`` weights false positives
# and ``beta`` weights false negatives. Weighting false negatives more favours recall of
# small cells.
TVERSKY_ALPHA_FALSE_POSITIVE = 0.3
TVERSKY_BETA_FALSE_NEGATIVE = 0.7

# Focal Tversky loss of Abraham and Khan (ISBI 2019, arXiv:1810.07842):
# (1 - Tversky index) ** (1 / gamma), with gamma = 4/3 in their experiments.
FOCAL_TVERSKY_GAMMA = 4.0 / 3.0


class FocalTverskyLoss(nn.Module):
    """Focal Tversky loss ``(1 - TI) ** (1 / gamma)`` for binary segmentation.

    The Tversky index TI comes from ``segmentation_models_pytorch.losses.TverskyLoss``
    in binary mode. That class also has a ``gamma``, but it raises the loss to the power
    ``gamma`` itself, and any power below 1 has an infinite derivative at a loss of 0.
    A batch without cells and a perfect prediction both reach 0 and would give NaN
    gradients. This class clamps the loss at ``eps`` before taking the power.

    Parameters
    ----------
    alpha : float
        Weight of false positives in the Tversky index.
    beta : float
        Weight of false negatives in the Tversky index.
    gamma : float
        Focal parameter as defined by Abraham and Khan. The loss is raised to the power
        ``1 / gamma``, so gamma > 1 raises small losses.
    eps : float
        Smallest loss value that the power is applied to.
    """

    def __init__(
        self,
        alpha: float = TVERSKY_ALPHA_FALSE_POSITIVE,
        beta: float = TVERSKY_BETA_FALSE_NEGATIVE,
        gamma: float = FOCAL_TVERSKY_GAMMA,
        eps: float = 1e-6,
    ) -> None:
        super().__init__()
        if gamma <= 0:
            raise ValueError(f"gamma must be above 0, got {gamma}. Abraham and Khan use 4/3.")
        self.tversky = smp_losses.TverskyLoss(
            smp_losses.BINARY_MODE, from_logits=True, alpha=alpha, beta=beta, gamma=1.0
        )
        self.gamma = gamma
        self.eps = eps

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        tversky_loss = self.tversky(logits, target)
        return tversky_loss.clamp_min(self.eps) ** (1.0 / self.gamma)


def build_loss(name: str) -> nn.Module:
    """Build a segmentation loss by name.

    Parameters
    ----------
    name : str
        One of :data:`LOSSES`:

        - ``"dice"``: soft Dice loss, ``smp.losses.DiceLoss`` in binary mode.
        - ``"focal"``: focal loss with gamma 2, ``smp.losses.FocalLoss`` in binary mode.
        - ``"tversky"``: Tversky loss, ``smp.losses.TverskyLoss`` with false-positive
          weight 0.3 and false-negative weight 0.7.
        - ``"focal_tversky"``: :class:`FocalTverskyLoss` with the same weights and
          gamma 4/3.
        - ``"bce"``: binary cross-entropy on logits, ``smp.losses.SoftBCEWithLogitsLoss``.

    Returns
    -------
    torch.nn.Module
        Called as ``loss(logits, target)`` with float32 tensors of shape (N, 1, H, W),
        targets 0 or 1. Returns a scalar tensor.

    Raises
    ------
    ValueError
        If ``name`` is not in :data:`LOSSES`.

    Notes
    -----
    The Dice, Tversky and focal Tversky losses pool all pixels of the batch. smp 0.6.0
    sets them to 0, with zero gradient, when the batch has no cell pixels at all. Such a batch
    then teaches nothing, so false positives on empty images cost nothing. Use ``"bce"``
    or ``"focal"`` when many training crops contain no cells.
    """
    if name == "dice":
        return smp_losses.DiceLoss(smp_losses.BINARY_MODE, from_logits=True)
    if name == "focal":
        return smp_losses.FocalLoss(smp_losses.BINARY_MODE, gamma=2.0)
    if name == "tversky":
        return smp_losses.TverskyLoss(
            smp_losses.BINARY_MODE,
            from_logits=True,
            alpha=TVERSKY_ALPHA_FALSE_POSITIVE,
            beta=TVERSKY_BETA_FALSE_NEGATIVE,
        )
    if name == "focal_tversky":
        return FocalTverskyLoss()
    if name == "bce":
        return smp_losses.SoftBCEWithLogitsLoss()
    raise ValueError(f"unknown loss name {name!r}. Choose one of {', '.join(LOSSES)}.")
