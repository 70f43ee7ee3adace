"""Learning-rate range test (Smith, "Cyclical Learning Rates for Training Neural Networks", 2017).

A fresh model trains for a few steps while the learning rate grows exponentially from
``min_lr`` to ``max_lr``. The loss first stays flat, then falls, then diverges. The
chosen rate is the one at the lowest smoothed loss divided by ``divisor``, a point on the
falling part where training is fast but stable.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import torch

from ccflow.data import CropDataset, Sample, load_pair
from ccflow.losses import build_loss
from ccflow.model import build_model

logger = logging.getLogger(__name__)


@dataclass
class LrFindResult:
    """Learning rates tried, their smoothed losses and the chosen rate."""

    lrs: list[float]
    losses: list[float]
    chosen_lr: float
    min_loss_lr: float


def find_lr(
    config,
    train_samples: list[Sample],
    *,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    steps: int = 60,
    divisor: float = 10.0,
    smoothing: float = 0.9,
) -> LrFindResult:
    """Run the learning-rate range test on training crops and return the chosen rate.

    Parameters
    ----------
    config : ccflow.train.TrainConfig
        Model, loss, crop and batch settings; ``seed`` fixes the crops and weights.
    train_samples : list of Sample
        Labelled training images.
    min_lr, max_lr : float
        First and last learning rate of the exponential sweep.
    steps : int
        Optimisation steps; each one uses ``config.batch_size`` crops.
    divisor : float
        The chosen rate is the rate at the lowest smoothed loss divided by this.
    smoothing : float
        Weight of the past in the exponential moving average of the loss, in [0, 1).

    Notes
    -----
    The test stops early once the smoothed loss exceeds 4 times its minimum, because
    the rates beyond that point only diverge. It runs in the calling process with plain
    PyTorch on the CPU, or on a GPU when one is visible.
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(f"Invalid learning-rate range {min_lr}..{max_lr}: need 0 < min_lr < max_lr.")
    if steps < 5:
        raise ValueError(f"Invalid steps={steps}: the range test needs at least 5 steps.")
    if not 0 <= smoothing < 1:
        raise ValueError(f"Invalid smoothing={smoothing}: use a value in [0, 1).")

    torch.manual_seed(config.seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    pairs = [load_pair(s) for s in train_samples]
    crops = CropDataset(
        [p[0] for p in pairs], [p[1] for p in pairs],
        crop_size=config.crop_size, scale=config.scale,
        length=steps * config.batch_size, augment=True, seed=config.seed,
    )
    loader = torch.utils.data.DataLoader(crops, batch_size=config.batch_size, shuffle=False)
    model = build_model(config.arch, config.base_width).to(device).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=min_lr, weight_decay=config.weight_decay)
    loss_fn = build_loss(config.loss)
    factor = (max_lr / min_lr) ** (1 / (steps - 1))

    lrs, losses = [], []
    average, best = 0.0, math.inf
    for step, (images, masks) in enumerate(loader):
        lr = min_lr * factor**step
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss = loss_fn(model(images.to(device)), masks.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        # Bias-corrected exponential moving average, as in Adam's first moment.
        average = smoothing * average + (1 - smoothing) * float(loss.detach())
        smoothed = average / (1 - smoothing ** (step + 1))
        lrs.append(lr)
        losses.append(smoothed)
        best = min(best, smoothed)
        if not math.isfinite(smoothed) or smoothed > 4 * best:
            logger.info("Range test stopped at lr %.2e: the loss diverged", lr)
            break

    min_loss_lr = lrs[int(np.nanargmin(losses))]
    chosen = max(min_loss_lr / divisor, min_lr)
    logger.info("Range test: lowest loss at lr %.2e, chosen lr %.2e", min_loss_lr, chosen)
    return LrFindResult(lrs=lrs, losses=losses, chosen_lr=chosen, min_loss_lr=min_loss_lr)


def log_lr_find(result: LrFindResult) -> None:
    """Log the range test to the active MLflow run: the plot, the curve and the chosen rate."""
    import matplotlib.pyplot as plt
    import mlflow

    from ccflow.plots import lr_range_plot

    figure = lr_range_plot(result.lrs, result.losses, result.chosen_lr)
    mlflow.log_figure(figure, "lr_find/lr_range_test.png")
    plt.close(figure)
    mlflow.log_dict({"lr": result.lrs, "smoothed_loss": result.losses}, "lr_find/curve.json")
    mlflow.log_params({"lr_chosen": result.chosen_lr, "lr_find_min_loss_lr": result.min_loss_lr})
