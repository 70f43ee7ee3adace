"""Tests for ccflow.losses: ordering of good and bad predictions, gradients, errors."""

import pytest
import torch

from ccflow.losses import LOSSES, FocalTverskyLoss, build_loss

# Logit magnitude of a confident prediction: sigmoid(8) is about 0.9997.
CONFIDENT_LOGIT = 8.0


def square_target() -> torch.Tensor:
    """Return a (2, 1, 16, 16) float target with one 6x6 square cell per image."""
    target = torch.zeros(2, 1, 16, 16)
    target[0, 0, 2:8, 3:9] = 1.0
    target[1, 0, 8:14, 6:12] = 1.0
    return target


def logits_for(mask: torch.Tensor) -> torch.Tensor:
    """Return confident logits that predict exactly ``mask``."""
    return (2.0 * mask - 1.0) * CONFIDENT_LOGIT


@pytest.mark.parametrize("name", LOSSES)
def test_perfect_prediction_beats_wrong(name: str) -> None:
    loss = build_loss(name)
    target = square_target()

    perfect = loss(logits_for(target), target)
    inverted = loss(logits_for(1.0 - target), target)
    uncertain = loss(torch.zeros_like(target), target)

    assert perfect < uncertain
    assert uncertain < inverted


@pytest.mark.parametrize("name", LOSSES)
def test_loss_is_scalar_with_gradient(name: str) -> None:
    torch.manual_seed(0)
    loss = build_loss(name)
    logits = torch.randn(2, 1, 16, 16, requires_grad=True)

    value = loss(logits, square_target())
    value.backward()

    assert value.ndim == 0
    assert value.requires_grad
    assert torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES)
def test_empty_target_gradient_is_finite(name: str) -> None:
    torch.manual_seed(0)
    loss = build_loss(name)
    logits = torch.randn(2, 1, 16, 16, requires_grad=True)

    value = loss(logits, torch.zeros(2, 1, 16, 16))
    value.backward()

    assert torch.isfinite(value)
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", LOSSES)
def test_perfect_prediction_gradient_is_finite(name: str) -> None:
    target = square_target()
    # With logits of +-20 the float32 Tversky loss is within rounding of 0, where a power
    # below 1 has an infinite derivative.
    logits = (logits_for(target) * 2.5).requires_grad_(True)

    build_loss(name)(logits, target).backward()

    assert torch.isfinite(logits.grad).all()


def test_focal_tversky_is_power_of_tversky() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 1, 16, 16)
    target = square_target()

    tversky = build_loss("tversky")(logits, target)
    focal_tversky = build_loss("focal_tversky")(logits, target)

    assert torch.isclose(focal_tversky, tversky ** 0.75)
    assert focal_tversky > tversky


def test_tversky_penalises_misses_more() -> None:
    target = square_target()
    missed = target.clone()
    missed[0, 0, 2:8, 3:5] = 0.0  # 12 false-negative pixels
    extra = target.clone()
    extra[0, 0, 2:8, 9:11] = 1.0  # 12 false-positive pixels

    for name in ("tversky", "focal_tversky"):
        loss = build_loss(name)
        assert loss(logits_for(missed), target) > loss(logits_for(extra), target), name


def test_focal_tversky_rejects_bad_gamma() -> None:
    with pytest.raises(ValueError, match="gamma must be above 0, got 0"):
        FocalTverskyLoss(gamma=0)


@pytest.mark.parametrize("name", ["Dice", "cross_entropy", ""])
def test_unknown_loss_lists_choices(name: str) -> None:
    with pytest.raises(ValueError) as error:
        build_loss(name)

    message = str(error.value)
    assert repr(name) in message
    for choice in LOSSES:
        assert choice in message
