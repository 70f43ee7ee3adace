"""The Ray Train loop that every worker runs, and the checkpoints it writes and resumes from.

Each worker reads its own shard of the training crops through the ``DistributedSampler``
that ``ray.train.torch.prepare_data_loader`` adds, so ``samples_per_epoch`` crops are
split over the workers and one optimisation step uses ``batch_size * workers`` crops.
World rank 0 logs to MLflow and writes a checkpoint after every epoch.

An epoch's metrics reach MLflow only after its checkpoint is stored, and every
checkpoint carries the metric history up to its epoch. A run killed at any point
therefore resumes from its last stored checkpoint at the next epoch, and the driver
logs the history steps the killed run had not logged yet, so no epoch is lost or
repeated.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from ccflow.data import CropDataset, load_pair
from ccflow.evaluate import predict_probabilities, score_probabilities
from ccflow.losses import build_loss
from ccflow.model import build_model

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pt"
BEST_WEIGHTS_FILE = "best_weights.pt"
TRAINING_STATE_FILE = "training_state.pt"
CHECKPOINT_INFO_FILE = "checkpoint.json"
CHECKPOINT_PREFIX = "checkpoint_epoch_"
LR_SCHEDULES = ("plateau", "cosine")
COSINE_FLOOR = 0.01


@dataclass
class LoopState:
    """Progress of the training loop, stored in every checkpoint.

    ``history`` maps each completed epoch (as a string, for JSON) to its logged metrics.
    """

    epoch: int = -1
    best_loss: float = math.inf
    best_epoch: int = -1
    elapsed_s: float = 0.0
    history: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        values = dict(self.__dict__)
        # JSON has no infinity; a state without a best epoch stores null.
        values["best_loss"] = None if math.isinf(self.best_loss) else self.best_loss
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> LoopState:
        values = dict(values)
        if values.get("best_loss") is None:
            values["best_loss"] = math.inf
        return cls(**values)


def train_worker(loop_config: dict[str, Any]) -> None:
    """Run the training loop on one Ray Train worker; world rank 0 logs to MLflow."""
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm

    config = loop_config["train"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(loop_config["threads"])
    torch.manual_seed(config.seed + rank)
    np.random.seed(config.seed + rank)
    device = ray.train.torch.get_device()

    train_pairs = [load_pair(s) for s in loop_config["train_samples"]]
    val_pairs = [load_pair(s) for s in loop_config["val_samples"]]
    train_loader, val_loader, train_set = _make_loaders(config, train_pairs, val_pairs)

    network = build_model(config.arch, config.base_width)
    base_lr = loop_config["lr"]
    optimizer = torch.optim.Adam(network.parameters(), lr=base_lr, weight_decay=config.weight_decay)
    scheduler = None
    if config.lr_schedule == "plateau":
        scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.5, patience=max(1, config.patience // 2)
        )
    # Ray's own checkpoint exists after it restarted failed workers within this attempt;
    # otherwise a resumed run starts from the killed attempt's last checkpoint.
    checkpoint = ray.train.get_checkpoint() or loop_config.get("resume_checkpoint")
    state, best_weights = _restore(checkpoint, network, optimizer, scheduler)
    model = ray.train.torch.prepare_model(network)
    # Adam's state was loaded on the CPU; move it next to the parameters.
    _move_optimizer_state(optimizer, device)
    loss_fn = build_loss(config.loss)
    client = MlflowClient(loop_config["tracking_uri"]) if rank == 0 else None
    run_id = loop_config["run_id"]

    started = time.monotonic() - state.elapsed_s
    first_epoch = state.epoch + 1
    bar = tqdm(total=config.epochs, desc="epochs") if rank == 0 else None
    if bar is not None:
        bar.update(first_epoch)
    for epoch in range(first_epoch, config.epochs):
        if config.lr_schedule == "cosine":
            progress = training_progress(epoch, config.epochs, time.monotonic() - started, config.max_minutes)
            _set_lr(optimizer, cosine_lr(base_lr, _agree_on_value(progress, device)))
        train_set.set_epoch(epoch)
        train_sum, train_count = _run_epoch(model, train_loader, loss_fn, optimizer, device)
        val_sum, val_count = _run_epoch(model, val_loader, loss_fn, None, device)
        crops_per_worker = _gather(torch.tensor([train_sum, train_count], device=device))
        train_loss = float(crops_per_worker[:, 0].sum() / crops_per_worker[:, 1].sum().clamp(min=1))
        val_loss = val_sum / max(val_count, 1)
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step(val_loss)

        metrics = {"train_loss": train_loss, "val_loss": val_loss, "lr": lr}
        for worker, count in enumerate(crops_per_worker[:, 1].tolist()):
            metrics[f"train_crops_worker_{worker}"] = count
        if val_loss < state.best_loss - 1e-6:
            state.best_loss, state.best_epoch = val_loss, epoch
            if rank == 0:
                best_weights = _state_dict_copy(model)
        state.epoch = epoch
        state.elapsed_s = time.monotonic() - started

        if rank == 0:
            metrics["val_det_f1"] = _validation_detection_f1(model, config, val_pairs, device)
            state.history[str(epoch)] = metrics
        out_of_time = state.elapsed_s / 60 > config.max_minutes
        out_of_patience = epoch - state.best_epoch >= config.patience
        stop = _agree_on_stop(out_of_time or out_of_patience, device)
        _report(rank, epoch, metrics, model, best_weights, optimizer, scheduler, state)

        if rank == 0:
            # Logged after the checkpoint is stored: see the module docstring.
            log_epoch(client, run_id, epoch, metrics)
            bar.update(1)
            logger.info(
                "Epoch %d: train loss %.4f, validation loss %.4f, detection F1 %.3f",
                epoch, train_loss, val_loss, metrics["val_det_f1"],
            )
        if stop:
            if rank == 0:
                reason = "time budget reached" if out_of_time else "no improvement"
                client.set_tag(run_id, "stopped_because", reason)
                logger.info("Stopping after epoch %d: %s", epoch, reason)
            break
    if bar is not None:
        bar.close()


def _make_loaders(config, train_pairs, val_pairs):
    import ray.train.torch

    train_set = CropDataset(
        [p[0] for p in train_pairs],
        [p[1] for p in train_pairs],
        crop_size=config.crop_size,
        scale=config.scale,
        length=config.samples_per_epoch,
        augment=True,
        seed=config.seed,
    )
    val_set = CropDataset(
        [p[0] for p in val_pairs],
        [p[1] for p in val_pairs],
        crop_size=config.crop_size,
        scale=config.scale,
        length=max(4 * len(val_pairs), config.batch_size),
        augment=False,
        seed=config.seed,
    )
    # The DistributedSampler added here gives each worker a disjoint shard of the crop
    # indices; shuffle=False keeps the shards fixed, and the crops still change with
    # the epoch through CropDataset.set_epoch.
    train_loader = ray.train.torch.prepare_data_loader(
        torch.utils.data.DataLoader(train_set, batch_size=config.batch_size, shuffle=False)
    )
    # Every worker scores all validation crops, so all take the same stop decision.
    val_loader = ray.train.torch.prepare_data_loader(
        torch.utils.data.DataLoader(val_set, batch_size=config.batch_size, shuffle=False),
        add_dist_sampler=False,
    )
    return train_loader, val_loader, train_set


def _run_epoch(model, loader, loss_fn, optimizer, device) -> tuple[float, int]:
    """Train for one pass over ``loader``, or only score it when optimizer is None.

    Returns the summed loss over the crops and the number of crops.
    """
    training = optimizer is not None
    model.train(training)
    total, count = 0.0, 0
    with torch.set_grad_enabled(training):
        for images, masks in loader:
            images, masks = images.to(device), masks.to(device)
            loss = loss_fn(model(images), masks)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total += float(loss.detach()) * len(images)
            count += len(images)
    return total, count


def _gather(values: torch.Tensor) -> torch.Tensor:
    """Return a (world size, len(values)) CPU tensor of every worker's ``values``."""
    values = values.double()
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return values[None].cpu()
    gathered = [torch.zeros_like(values) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, values)
    return torch.stack(gathered).cpu()


def _agree_on_stop(stop: bool, device) -> bool:
    """Make every worker take rank 0's stop decision, so all call report equally often."""
    return bool(_agree_on_value(1.0 if stop else 0.0, device))


def _agree_on_value(value: float, device) -> float:
    """Return rank 0's ``value`` on every worker."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return value
    # NCCL only moves tensors that live on the GPU, so the value sits on the device.
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.broadcast(tensor, src=0)
    return float(tensor.item())


def training_progress(epoch: int, epochs: int, elapsed_s: float, max_minutes: float) -> float:
    """Return the share of the run used up before ``epoch`` starts, between 0 and 1.

    A run ends at its epoch limit or its time budget, whichever comes first, so the
    share is the larger of the epochs done and the minutes spent.
    """
    share = max(epoch / epochs, elapsed_s / (60.0 * max_minutes))
    return min(max(share, 0.0), 1.0)


def cosine_lr(base_lr: float, progress: float) -> float:
    """Return the learning rate at ``progress`` (0 to 1) of a cosine decay from ``base_lr``.

    The rate falls to ``COSINE_FLOOR`` times ``base_lr`` at the end of the run rather than
    to zero, so the last epoch still trains.
    """
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return base_lr * (COSINE_FLOOR + (1.0 - COSINE_FLOOR) * cosine)


def _set_lr(optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _validation_detection_f1(model, config, val_pairs, device) -> float:
    network = getattr(model, "module", model)
    probabilities = predict_probabilities(
        network, [p[0] for p in val_pairs], scale=config.scale, tile_size=config.tile_size,
        device=device,
    )
    postprocess = config.postprocess
    if config.threshold != "auto":
        postprocess = replace(postprocess, threshold=float(config.threshold))
    names = [str(i) for i in range(len(val_pairs))]
    evaluation = score_probabilities(names, probabilities, [p[1] for p in val_pairs], postprocess)
    return float(evaluation.pooled["det_f1"])


def log_epoch(client: MlflowClient, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
    """Log one epoch's metrics at step ``epoch``."""
    timestamp = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), timestamp, epoch) for k, v in metrics.items()],
    )


def _state_dict_copy(model) -> dict[str, torch.Tensor]:
    network = getattr(model, "module", model)
    return {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}


def _report(rank, epoch, metrics, model, best_weights, optimizer, scheduler, state) -> None:
    """Report the epoch to Ray Train; rank 0 attaches the checkpoint.

    ``ray.train.report`` is a barrier, and with the default synchronous upload it
    returns only once the checkpoint is stored.
    """
    import ray.train

    if rank != 0:
        ray.train.report({"epoch": epoch, **metrics})
        return
    with tempfile.TemporaryDirectory(prefix="ccflow-ckpt-") as directory:
        checkpoint = _write_checkpoint(
            Path(directory), model, best_weights, optimizer, scheduler, state
        )
        ray.train.report(
            {"epoch": epoch, **metrics},
            checkpoint=checkpoint,
            checkpoint_dir_name=f"{CHECKPOINT_PREFIX}{epoch:05d}",
        )


def _write_checkpoint(directory: Path, model, best_weights, optimizer, scheduler, state: LoopState):
    from ray.train import Checkpoint

    torch.save(_state_dict_copy(model), directory / WEIGHTS_FILE)
    torch.save(best_weights if best_weights is not None else _state_dict_copy(model),
               directory / BEST_WEIGHTS_FILE)
    # The cosine schedule is a function of the epoch and elapsed time, which the loop
    # state stores, so only the plateau scheduler has a state of its own.
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
        },
        directory / TRAINING_STATE_FILE,
    )
    # Written last: a checkpoint folder without it is incomplete.
    (directory / CHECKPOINT_INFO_FILE).write_text(json.dumps(state.to_json()))
    return Checkpoint.from_directory(str(directory))


def _restore(checkpoint, network, optimizer, scheduler):
    """Load a resumed checkpoint into the model, optimizer and scheduler, if there is one."""
    if checkpoint is None:
        return LoopState(), None
    with checkpoint.as_directory() as directory:
        directory = Path(directory)
        state = LoopState.from_json(json.loads((directory / CHECKPOINT_INFO_FILE).read_text()))
        network.load_state_dict(torch.load(directory / WEIGHTS_FILE, map_location="cpu", weights_only=True))
        best = torch.load(directory / BEST_WEIGHTS_FILE, map_location="cpu", weights_only=True)
        saved = torch.load(directory / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    if scheduler is not None and saved.get("scheduler") is not None:
        scheduler.load_state_dict(saved["scheduler"])
    logger.info("Resuming after epoch %d (best epoch %d)", state.epoch, state.best_epoch)
    return state, best


def _move_optimizer_state(optimizer, device) -> None:
    for values in optimizer.state.values():
        for key, value in values.items():
            if isinstance(value, torch.Tensor) and key != "step":
                values[key] = value.to(device)


def read_checkpoint_info(checkpoint) -> LoopState:
    """Return the loop state stored in a Ray ``Checkpoint``."""
    with checkpoint.as_directory() as directory:
        return LoopState.from_json(
            json.loads((Path(directory) / CHECKPOINT_INFO_FILE).read_text())
        )


def copy_best_weights(checkpoint, destination: Path) -> Path:
    """Copy the best weights of a checkpoint to ``destination`` / weights.pt and return the path."""
    destination.mkdir(parents=True, exist_ok=True)
    target = destination / WEIGHTS_FILE
    with checkpoint.as_directory() as directory:
        target.write_bytes((Path(directory) / BEST_WEIGHTS_FILE).read_bytes())
    return target


def find_latest_checkpoint(storage_uri: str):
    """Return the complete checkpoint with the highest epoch under ``storage_uri``, or None.

    ``storage_uri`` is a local folder, ``s3://`` or ``gs://`` URI holding one folder per
    training attempt, each with ``checkpoint_epoch_NNNNN`` folders. A checkpoint folder
    that lacks one of its files was cut off while being stored and is skipped.

    NOTE: a file truncated by a kill during the copy is not detected here; loading it
    then fails with a message from ``torch.load``.
    """
    import pyarrow.fs
    from ray.train import Checkpoint

    filesystem, root = pyarrow.fs.FileSystem.from_uri(_as_uri(storage_uri))
    selector = pyarrow.fs.FileSelector(root, recursive=True, allow_not_found=True)
    candidates = []
    for entry in filesystem.get_file_info(selector):
        path = entry.path
        parent = path.rsplit("/", 2)
        if (
            entry.type == pyarrow.fs.FileType.File
            and path.endswith("/" + CHECKPOINT_INFO_FILE)
            and len(parent) == 3
            and parent[1].startswith(CHECKPOINT_PREFIX)
        ):
            folder = path.rsplit("/", 1)[0]
            siblings = {
                info.base_name
                for info in filesystem.get_file_info(pyarrow.fs.FileSelector(folder))
            }
            if {WEIGHTS_FILE, BEST_WEIGHTS_FILE, TRAINING_STATE_FILE} <= siblings:
                candidates.append((int(parent[1][len(CHECKPOINT_PREFIX):]), folder))
    if not candidates:
        return None
    epoch, folder = max(candidates)
    logger.info("Latest checkpoint under %s: epoch %d in %s", storage_uri, epoch, folder)
    return Checkpoint(folder, filesystem=filesystem)


def _as_uri(storage: str) -> str:
    if "://" in storage:
        return storage
    return Path(storage).expanduser().resolve().as_uri()
