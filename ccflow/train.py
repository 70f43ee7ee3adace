"""Train a cell segmentation model with Ray Train and track it in MLflow.

The driver prepares the data split, opens the MLflow run and starts a Ray Train
``TorchTrainer``; the world-rank-0 worker logs per-epoch metrics into that run. When
training ends, the driver reloads the best checkpoint, evaluates it on the validation
images, logs the model as an MLflow pyfunc model and registers a new model version.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
import torch
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from ccflow import REGISTERED_MODEL_NAME
from ccflow.data import (
    CropDataset,
    Sample,
    dataset_fingerprint,
    list_samples,
    load_pair,
    split_samples,
)
from ccflow.errors import CcflowError
from ccflow.evaluate import choose_threshold, predict_probabilities, score_probabilities
from ccflow.losses import LOSSES, build_loss
from ccflow.model import build_model, count_parameters
from ccflow.postprocess import PostprocessConfig
from ccflow.synthetic import write_synthetic_dataset

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.pt"
CHECKPOINT_INFO_FILE = "checkpoint.json"


@dataclass
class TrainConfig:
    """Settings of one training run; every field is logged as an MLflow parameter.

    Sizes are in pixels of the original images unless the name says otherwise.
    """

    data: Path | None = None
    """Folder with ``images/`` and ``masks/``; None trains on generated synthetic images."""
    synthetic_images: int = 16
    arch: str = "c-resunet"
    base_width: int = 16
    loss: str = "focal"
    epochs: int = 40
    patience: int = 8
    max_minutes: float = 9.0
    crop_size: int = 512
    batch_size: int = 8
    samples_per_epoch: int = 96
    lr: float = 1e-3
    weight_decay: float = 1e-5
    seed: int = 0
    scale: float = 0.5
    val_fraction: float = 0.25
    tile_size: int = 512
    threshold: float | Literal["auto"] = 0.5
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    workers: int = 1
    use_gpu: bool = False
    experiment: str = "ccflow"
    register: bool = True
    model_name: str = REGISTERED_MODEL_NAME

    def validate(self) -> None:
        """Raise ValueError naming the first setting that is out of range."""
        if self.loss not in LOSSES:
            raise ValueError(f"Invalid loss {self.loss!r}: choose one of {', '.join(LOSSES)}.")
        positive = {
            "epochs": self.epochs,
            "crop_size": self.crop_size,
            "batch_size": self.batch_size,
            "samples_per_epoch": self.samples_per_epoch,
            "lr": self.lr,
            "scale": self.scale,
            "max_minutes": self.max_minutes,
            "workers": self.workers,
            "base_width": self.base_width,
            "tile_size": self.tile_size,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"Invalid {name}={value!r}: it must be greater than 0.")
        if self.patience < 1:
            raise ValueError(f"Invalid patience={self.patience!r}: use 1 or more epochs.")
        if not 0 < self.val_fraction < 1:
            raise ValueError(
                f"Invalid val_fraction={self.val_fraction!r}: it must lie between 0 and 1."
            )
        if self.threshold != "auto" and not 0 < float(self.threshold) < 1:
            raise ValueError(
                f"Invalid threshold={self.threshold!r}: use a number between 0 and 1, or 'auto'."
            )

    def to_params(self) -> dict[str, Any]:
        """Return the settings as flat MLflow parameters."""
        params = asdict(self)
        params.pop("postprocess")
        params["data"] = str(self.data) if self.data else "synthetic"
        params.update({f"postprocess_{k}": v for k, v in self.postprocess.to_dict().items()})
        params.pop("postprocess_threshold", None)
        return params


@dataclass
class TrainResult:
    """Outputs of a finished training run: its MLflow ids, metrics and chosen threshold."""

    run_id: str
    model_uri: str
    model_version: str | None
    metrics: dict[str, float]
    threshold: float


def train(config: TrainConfig) -> TrainResult:
    """Train, evaluate, log and register a model as one MLflow run.

    When the process runs inside ``mlflow run`` (``MLFLOW_RUN_ID`` is set), that run is
    reused; otherwise a new run opens in the experiment ``config.experiment``.

    Raises
    ------
    ValueError
        A setting is out of range.
    ccflow.errors.DatasetError
        The dataset folder is missing, empty, or has images without masks.
    """
    config.validate()
    data_dir = _resolve_data(config)
    samples = list_samples(data_dir, require_masks=True)
    if len(samples) < 2:
        raise CcflowError(
            f"Training needs at least 2 labelled images, found {len(samples)} in {data_dir}: "
            "add images, one is held out for validation."
        )
    train_samples, val_samples = split_samples(samples, config.val_fraction, config.seed)
    fingerprint = dataset_fingerprint(samples)

    if "MLFLOW_RUN_ID" not in os.environ:
        mlflow.set_experiment(config.experiment)
    with mlflow.start_run() as run:
        run_id = run.info.run_id
        logger.info("MLflow run %s: training on %s", run_id, data_dir)
        _log_setup(config, data_dir, train_samples, val_samples, fingerprint)
        started = time.monotonic()
        weights, info = _fit_with_ray(config, train_samples, val_samples, run_id)
        mlflow.log_metric("train_minutes", (time.monotonic() - started) / 60)
        mlflow.log_artifact(str(weights), artifact_path="checkpoints")

        model = build_model(config.arch, config.base_width)
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
        model.eval()
        evaluation = _final_evaluation(config, model, val_samples)
        mlflow.log_metric("best_epoch", info["epoch"])
        # "eval_" keeps the final scores apart from the per-epoch "val_" histories.
        result_metrics = {f"eval_{k}": float(v) for k, v in evaluation.pooled.items()}
        mlflow.log_metrics(result_metrics)
        mlflow.log_table(evaluation.per_image, artifact_file="evaluation/val_per_image.json")
        _log_dataframe(evaluation.per_image, "evaluation/val_per_image.csv")

        from ccflow.registry import log_counter_model

        model_info = log_counter_model(
            weights=weights,
            arch=config.arch,
            base_width=config.base_width,
            scale=config.scale,
            tile_size=config.tile_size,
            postprocess=evaluation.postprocess,
            registered_model_name=config.model_name if config.register else None,
            version_tags={"data_fingerprint": fingerprint, **_rounded(result_metrics)},
        )
    version = (
        str(model_info.registered_model_version)
        if model_info.registered_model_version is not None
        else None
    )
    uri = f"models:/{config.model_name}/{version}" if version else model_info.model_uri
    logger.info("MLflow run %s finished; model %s", run_id, uri)
    return TrainResult(
        run_id=run_id,
        model_uri=uri,
        model_version=version,
        metrics=result_metrics,
        threshold=evaluation.postprocess.threshold,
    )


def _resolve_data(config: TrainConfig) -> Path:
    if config.data is not None:
        return Path(config.data)
    # Generated once per seed and image count, then reused by later runs.
    cache = Path(tempfile.gettempdir()) / "ccflow-synthetic" / (
        f"seed{config.seed}-n{config.synthetic_images}"
    )
    logger.info("No data folder given: training on synthetic images in %s", cache)
    return write_synthetic_dataset(cache, n_images=config.synthetic_images, seed=config.seed)


def _log_setup(
    config: TrainConfig,
    data_dir: Path,
    train_samples: list[Sample],
    val_samples: list[Sample],
    fingerprint: str,
) -> None:
    params = {
        **config.to_params(),
        "data_dir": str(data_dir.resolve()),
        "n_train_images": len(train_samples),
        "n_val_images": len(val_samples),
        "parameters": count_parameters(build_model(config.arch, config.base_width)),
    }
    # `mlflow run` has already logged the MLproject parameters as the user typed them
    # ("9" where ccflow would write "9.0"), and MLflow rejects a changed value.
    already_logged = mlflow.active_run().data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in already_logged})
    mlflow.set_tag("data_fingerprint", fingerprint)
    mlflow.log_dict(
        {
            "train": [s.name for s in train_samples],
            "validation": [s.name for s in val_samples],
            "seed": config.seed,
            "val_fraction": config.val_fraction,
        },
        "data_split.json",
    )


def _fit_with_ray(
    config: TrainConfig,
    train_samples: list[Sample],
    val_samples: list[Sample],
    run_id: str,
) -> tuple[Path, dict[str, Any]]:
    """Run the Ray Train loop and return the best weights file and its epoch info."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(configure_logging=False)
    cpus = int(ray.available_resources().get("CPU", 1))
    cpus_per_worker = max(1, cpus // config.workers)

    loop_config = {
        "train": config,
        "train_samples": train_samples,
        "val_samples": val_samples,
        "run_id": run_id,
        "tracking_uri": _absolute_tracking_uri(),
        "threads": cpus_per_worker,
    }
    storage = Path(tempfile.mkdtemp(prefix="ccflow-ray-"))
    trainer = TorchTrainer(
        _train_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=config.use_gpu,
            resources_per_worker={"CPU": cpus_per_worker},
        ),
        run_config=RunConfig(
            name=f"ccflow-{run_id}",
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(
            f"Training run {run_id} reported no checkpoint; see the worker log above."
        )
    with result.checkpoint.as_directory() as directory:
        info = json.loads((Path(directory) / CHECKPOINT_INFO_FILE).read_text())
        weights = Path(tempfile.mkdtemp(prefix="ccflow-best-")) / WEIGHTS_FILE
        weights.write_bytes((Path(directory) / WEIGHTS_FILE).read_bytes())
    logger.info("Best checkpoint: epoch %d, validation loss %.4f", info["epoch"], info["val_loss"])
    return weights, info


def _absolute_tracking_uri() -> str:
    # Ray workers may start in another working folder, so a relative SQLite path
    # (the MLflow default "sqlite:///mlflow.db") is made absolute for them.
    uri = mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _train_worker(loop_config: dict[str, Any]) -> None:
    """Ray Train loop, run by every worker; world rank 0 logs to MLflow."""
    import ray.train
    import ray.train.torch
    from ray.experimental.tqdm_ray import tqdm

    config: TrainConfig = loop_config["train"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    torch.set_num_threads(loop_config["threads"])
    torch.manual_seed(config.seed + rank)
    np.random.seed(config.seed + rank)

    train_pairs = [load_pair(s) for s in loop_config["train_samples"]]
    val_pairs = [load_pair(s) for s in loop_config["val_samples"]]
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
    train_loader = ray.train.torch.prepare_data_loader(
        torch.utils.data.DataLoader(train_set, batch_size=config.batch_size, shuffle=False)
    )
    val_loader = ray.train.torch.prepare_data_loader(
        torch.utils.data.DataLoader(val_set, batch_size=config.batch_size, shuffle=False),
        add_dist_sampler=False,
    )

    model = ray.train.torch.prepare_model(build_model(config.arch, config.base_width))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimizer, factor=0.5, patience=max(1, config.patience // 2)
    )
    loss_fn = build_loss(config.loss)
    client = MlflowClient(loop_config["tracking_uri"]) if rank == 0 else None
    run_id = loop_config["run_id"]

    started = time.monotonic()
    best_loss, best_epoch = math.inf, -1
    bar = tqdm(total=config.epochs, desc="epochs") if rank == 0 else None
    for epoch in range(config.epochs):
        train_set.set_epoch(epoch)
        train_loss = _run_epoch(model, train_loader, loss_fn, optimizer)
        val_loss = _run_epoch(model, val_loader, loss_fn, None)
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step(val_loss)

        metrics = {"train_loss": train_loss, "val_loss": val_loss, "lr": lr}
        checkpoint = None
        improved = val_loss < best_loss - 1e-6
        if improved:
            best_loss, best_epoch = val_loss, epoch
        if rank == 0:
            metrics["val_det_f1"] = _validation_detection_f1(model, config, val_pairs)
            _log_epoch(client, run_id, epoch, metrics)
            if improved:
                checkpoint = _make_checkpoint(model, epoch, val_loss)
            bar.update(1)
            logger.info(
                "Epoch %d: train loss %.4f, validation loss %.4f, detection F1 %.3f",
                epoch, train_loss, val_loss, metrics["val_det_f1"],
            )

        out_of_time = (time.monotonic() - started) / 60 > config.max_minutes
        out_of_patience = epoch - best_epoch >= config.patience
        stop = _agree_on_stop(out_of_time or out_of_patience)
        ray.train.report({"epoch": epoch, **metrics}, checkpoint=checkpoint)
        if stop:
            if rank == 0:
                reason = "time budget reached" if out_of_time else "no improvement"
                client.set_tag(run_id, "stopped_because", reason)
                logger.info("Stopping after epoch %d: %s", epoch, reason)
            break
    if bar is not None:
        bar.close()


def _run_epoch(model, loader, loss_fn, optimizer) -> float:
    """Train for one pass over ``loader``, or only score it when optimizer is None."""
    training = optimizer is not None
    model.train(training)
    total, count = 0.0, 0
    with torch.set_grad_enabled(training):
        for images, masks in loader:
            loss = loss_fn(model(images), masks)
            if training:
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
            total += float(loss.detach()) * len(images)
            count += len(images)
    return total / max(count, 1)


def _validation_detection_f1(model, config: TrainConfig, val_pairs) -> float:
    network = getattr(model, "module", model)
    probabilities = predict_probabilities(
        network, [p[0] for p in val_pairs], scale=config.scale, tile_size=config.tile_size
    )
    postprocess = config.postprocess
    if config.threshold != "auto":
        postprocess = replace(postprocess, threshold=float(config.threshold))
    names = [str(i) for i in range(len(val_pairs))]
    evaluation = score_probabilities(names, probabilities, [p[1] for p in val_pairs], postprocess)
    return float(evaluation.pooled["det_f1"])


def _log_epoch(client: MlflowClient, run_id: str, epoch: int, metrics: dict[str, float]) -> None:
    timestamp = int(time.time() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), timestamp, epoch) for k, v in metrics.items()],
    )


def _make_checkpoint(model, epoch: int, val_loss: float):
    from ray.train import Checkpoint

    directory = Path(tempfile.mkdtemp(prefix="ccflow-ckpt-"))
    network = getattr(model, "module", model)
    torch.save(network.state_dict(), directory / WEIGHTS_FILE)
    info = {"epoch": epoch, "val_loss": val_loss}
    (directory / CHECKPOINT_INFO_FILE).write_text(json.dumps(info))
    return Checkpoint.from_directory(str(directory))


def _agree_on_stop(stop: bool) -> bool:
    """Make every worker take rank 0's stop decision, so all call report equally often."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return stop
    flag = torch.tensor([1.0 if stop else 0.0])
    torch.distributed.broadcast(flag, src=0)
    return bool(flag.item())


def _final_evaluation(config: TrainConfig, model, val_samples: list[Sample]):
    pairs = [load_pair(s) for s in val_samples]
    images, masks = [p[0] for p in pairs], [p[1] for p in pairs]
    probabilities = predict_probabilities(
        model, images, scale=config.scale, tile_size=config.tile_size
    )
    postprocess = config.postprocess
    if config.threshold == "auto":
        threshold = choose_threshold(probabilities, masks, postprocess)
        mlflow.log_param("threshold_chosen", threshold)
    else:
        threshold = float(config.threshold)
    postprocess = replace(postprocess, threshold=threshold)
    return score_probabilities([s.name for s in val_samples], probabilities, masks, postprocess)


def _log_dataframe(frame, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / Path(artifact_file).name
        frame.to_csv(path, index=False)
        mlflow.log_artifact(str(path), artifact_path=str(Path(artifact_file).parent))


def _rounded(metrics: dict[str, float]) -> dict[str, str]:
    return {k: f"{v:.4f}" for k, v in metrics.items() if np.isfinite(v)}
