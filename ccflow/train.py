"""Train a cell segmentation model with Ray Train and track it in MLflow.

The driver prepares the data split, opens the MLflow run and starts a Ray Train
``TorchTrainer`` over one or more workers (:mod:`ccflow.train_loop`); the world-rank-0
worker logs per-epoch metrics into that run and stores a checkpoint after every epoch.
When training ends, the driver reloads the best weights, evaluates them on the
validation images (and on a separate test folder when one is given), logs plots, energy
and the model as an MLflow pyfunc model, and registers a new model version.

A killed run resumes from its last checkpoint into the same MLflow run
(``TrainConfig.resume``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import mlflow
import numpy as np
import pandas as pd
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ccflow import REGISTERED_MODEL_NAME
from ccflow.data import Sample, dataset_fingerprint, list_samples, load_pair, split_samples
from ccflow.energy import DEFAULT_COUNTRY, EnergyReport, log_energy, track_energy
from ccflow.errors import CcflowError
from ccflow.evaluate import (
    Evaluation,
    choose_threshold,
    predict_probabilities,
    score_probabilities,
)
from ccflow.losses import LOSSES
from ccflow.model import build_model, count_parameters
from ccflow.postprocess import PostprocessConfig, label_cells
from ccflow.synthetic import write_synthetic_dataset
from ccflow.train_loop import (
    LR_SCHEDULES,
    copy_best_weights,
    find_latest_checkpoint,
    log_epoch,
    read_checkpoint_info,
    train_worker,
)

logger = logging.getLogger(__name__)

CHECKPOINT_STORAGE_TAG = "ccflow.checkpoint_storage"
CURVE_METRICS = ("train_loss", "val_loss", "val_det_f1")
# Settings that must be equal when a run resumes: they define the model, the data split
# and the crops, so a resumed run with other values would not continue the same training.
RESUME_FIXED_PARAMS = (
    "arch", "base_width", "loss", "seed", "crop_size", "scale", "batch_size",
    "samples_per_epoch", "val_fraction",
)


@dataclass
class TrainConfig:
    """Settings of one training run; every field is logged as an MLflow parameter.

    Sizes are in pixels of the original images unless the name says otherwise.
    """

    data: Path | None = None
    """Folder with ``images/`` and ``masks/``; None trains on generated synthetic images."""
    test_data: Path | None = None
    """Labelled folder scored after training and logged as ``test_*`` metrics; None skips it."""
    synthetic_images: int = 16
    arch: str = "c-resunet"
    base_width: int = 16
    loss: str = "focal"
    epochs: int = 40
    patience: int = 8
    max_minutes: float = 9.0
    crop_size: int = 512
    batch_size: int = 8
    """Crops per optimisation step and worker; a step uses ``batch_size * workers`` crops."""
    samples_per_epoch: int = 96
    """Crops per epoch over all workers together."""
    lr: float | Literal["auto"] = 1e-3
    """Adam learning rate, or "auto" to run the learning-rate range test first."""
    lr_schedule: Literal["plateau", "cosine"] = "plateau"
    """Learning-rate schedule. "plateau" halves the rate when the validation loss stalls for
    ``patience // 2`` epochs. "cosine" decays it to 1 % of ``lr`` by the epoch limit or
    the time budget, whichever comes first."""
    weight_decay: float = 1e-5
    seed: int = 0
    scale: float = 0.5
    val_fraction: float = 0.25
    tile_size: int = 512
    threshold: float | Literal["auto"] = 0.5
    postprocess: PostprocessConfig = field(default_factory=PostprocessConfig)
    workers: int = 1
    use_gpu: bool | Literal["auto"] = "auto"
    """One GPU per worker; "auto" uses GPUs when the Ray cluster has at least one."""
    ray_address: str | None = None
    """Address of a running Ray cluster ("auto", "ray://host:10001"); None starts a local one."""
    storage_path: str | None = None
    """Folder or s3:// / gs:// URI for Ray Train checkpoints; None uses a folder under the
    system temporary folder, which a reboot may clear."""
    resume: str | None = None
    """MLflow run id of a killed run to continue from its last checkpoint."""
    country: str = DEFAULT_COUNTRY
    """ISO 3166-1 alpha-3 code of the electricity grid used for the CO2 estimate."""
    system_metrics: bool = True
    """Record MLflow system metrics (CPU, memory, GPU when present) during the run."""
    overlays: int = 3
    """Validation images logged with predicted and true outlines."""
    run_name: str | None = None
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
            "scale": self.scale,
            "max_minutes": self.max_minutes,
            "workers": self.workers,
            "base_width": self.base_width,
            "tile_size": self.tile_size,
        }
        for name, value in positive.items():
            if not value > 0:
                raise ValueError(f"Invalid {name}={value!r}: it must be greater than 0.")
        if self.lr != "auto" and not float(self.lr) > 0:
            raise ValueError(f"Invalid lr={self.lr!r}: use a number greater than 0, or 'auto'.")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"Invalid lr_schedule={self.lr_schedule!r}: choose one of {', '.join(LR_SCHEDULES)}."
            )
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
        if self.use_gpu not in (True, False, "auto"):
            raise ValueError(f"Invalid use_gpu={self.use_gpu!r}: use true, false or 'auto'.")
        if self.overlays < 0:
            raise ValueError(f"Invalid overlays={self.overlays!r}: use 0 or more images.")
        if self.samples_per_epoch < self.workers:
            raise ValueError(
                f"Invalid samples_per_epoch={self.samples_per_epoch}: each of the "
                f"{self.workers} workers needs at least one crop per epoch."
            )

    def to_params(self) -> dict[str, Any]:
        """Return the settings as flat MLflow parameters."""
        params = asdict(self)
        params.pop("postprocess")
        params["data"] = str(self.data) if self.data else "synthetic"
        params["test_data"] = str(self.test_data) if self.test_data else ""
        for key in ("ray_address", "storage_path", "resume", "run_name"):
            params[key] = params[key] or ""
        params.update({f"postprocess_{k}": v for k, v in self.postprocess.to_dict().items()})
        params.pop("postprocess_threshold", None)
        return params


@dataclass
class TrainResult:
    """Outputs of a finished training run: its MLflow ids, metrics and chosen threshold.

    ``metrics`` contains the final ``eval_*`` validation scores and, with test data, the
    ``test_*`` scores.
    """

    run_id: str
    model_uri: str
    model_version: str | None
    metrics: dict[str, float]
    threshold: float
    per_image: pd.DataFrame | None = None
    energy: EnergyReport | None = None


def train(config: TrainConfig) -> TrainResult:
    """Train, evaluate, log and register a model as one MLflow run.

    When the process runs inside ``mlflow run`` (``MLFLOW_RUN_ID`` is set), that run is
    reused; when another run is active (a sweep's parent run), the new run is its child;
    with ``config.resume`` the given run continues. Otherwise a new run opens in the
    experiment ``config.experiment``.

    Raises
    ------
    ValueError
        A setting is out of range.
    ccflow.errors.DatasetError
        The dataset folder is missing, empty, or has images without masks.
    ccflow.errors.CcflowError
        The run to resume is missing, has no checkpoint or was trained with other settings.
    """
    config.validate()
    data_dir = resolve_data(config)
    samples = list_samples(data_dir, require_masks=True)
    if len(samples) < 2:
        raise CcflowError(
            f"Training needs at least 2 labelled images, found {len(samples)} in {data_dir}: "
            "add images, one is held out for validation."
        )
    # Data validation: every pair must pass the suites in validation/, else DatasetError.
    from ccflow.validation import check_training_samples

    check_training_samples(samples)
    train_samples, val_samples = split_samples(samples, config.val_fraction, config.seed)
    fingerprint = dataset_fingerprint(samples)
    test_samples = list_samples(config.test_data, require_masks=True) if config.test_data else []
    resumed = _find_resume_checkpoint(config, fingerprint) if config.resume else None

    with _start_run(config) as run, tempfile.TemporaryDirectory(prefix="ccflow-energy-") as energy_dir:
        run_id = run.info.run_id
        logger.info("MLflow run %s: training on %s", run_id, data_dir)
        _log_setup(config, data_dir, train_samples, val_samples, fingerprint)
        with track_energy("train", Path(energy_dir), config.country) as energy:
            lr = _resolve_lr(config, train_samples, run)
            started = time.monotonic()
            weights, info = _fit_with_ray(config, train_samples, val_samples, run_id, lr, resumed)
            mlflow.log_metric("train_minutes", (time.monotonic() - started) / 60)
            result_metrics, evaluation = _evaluate_and_log(config, weights, val_samples, test_samples)
        log_energy(energy.report)
        mlflow.log_metric("best_epoch", info.best_epoch)
        _log_training_curves(run_id)
        # Drift reference: image profile and validation predictions, as reference_profile.json.
        from ccflow.drift import log_training_reference

        log_training_reference(samples, val_samples, weights, config, evaluation.postprocess)

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
        per_image=evaluation.per_image,
        energy=energy.report,
    )


def resolve_data(config: TrainConfig) -> Path:
    if config.data is not None:
        return Path(config.data)
    # Generated once per seed and image count, then reused by later runs.
    cache = Path(tempfile.gettempdir()) / "ccflow-synthetic" / (
        f"seed{config.seed}-n{config.synthetic_images}"
    )
    logger.info("No data folder given: training on synthetic images in %s", cache)
    return write_synthetic_dataset(cache, n_images=config.synthetic_images, seed=config.seed)


def _start_run(config: TrainConfig):
    """Open the MLflow run: the resumed one, the `mlflow run` one, a child, or a new one."""
    if config.resume:
        launched = os.environ.get("MLFLOW_RUN_ID")
        if launched and launched != config.resume:
            # `mlflow run` created a run of its own before ccflow started; it stays empty.
            MlflowClient().set_tag(launched, "ccflow.resumed_into", config.resume)
        logger.info("Resuming MLflow run %s", config.resume)
        return mlflow.start_run(run_id=config.resume, log_system_metrics=config.system_metrics)
    parent = mlflow.active_run()
    if parent is not None:
        return mlflow.start_run(
            experiment_id=parent.info.experiment_id,
            run_name=config.run_name,
            nested=True,
            log_system_metrics=config.system_metrics,
        )
    if "MLFLOW_RUN_ID" not in os.environ:
        mlflow.set_experiment(config.experiment)
    return mlflow.start_run(run_name=config.run_name, log_system_metrics=config.system_metrics)


def _find_resume_checkpoint(config: TrainConfig, fingerprint: str):
    """Check that the run to resume matches ``config`` and return its last checkpoint."""
    client = MlflowClient()
    try:
        run = client.get_run(config.resume)
    except MlflowException as error:
        raise CcflowError(
            f"Cannot resume run {config.resume!r}: it was not found at the tracking URI "
            f"{mlflow.get_tracking_uri()}. Check the run id and MLFLOW_TRACKING_URI."
        ) from error
    params = config.to_params()
    changed = [
        f"{key} (run: {run.data.params[key]!r}, now: {params[key]!r})"
        for key in RESUME_FIXED_PARAMS
        if key in run.data.params and not _same_value(run.data.params[key], params[key])
    ]
    if run.data.tags.get("data_fingerprint", fingerprint) != fingerprint:
        changed.append("the dataset's images and masks")
    if changed:
        raise CcflowError(
            f"Cannot resume run {config.resume}: these settings differ from the run's: "
            f"{'; '.join(changed)}. Pass the run's values, or train a new run."
        )
    storage = run.data.tags.get(CHECKPOINT_STORAGE_TAG)
    checkpoint = find_latest_checkpoint(storage) if storage else None
    if checkpoint is None:
        raise CcflowError(
            f"Cannot resume run {config.resume}: no checkpoint found under "
            f"{storage or 'its checkpoint storage (tag missing)'}. Train a new run instead."
        )
    return checkpoint


def _same_value(logged: str, value: Any) -> bool:
    # `mlflow run` logs parameters as typed ("0.50"), ccflow as Python writes them ("0.5").
    try:
        return float(logged) == float(value)
    except (TypeError, ValueError):
        return logged == str(value)


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
        "batch_size_per_worker": config.batch_size,
        "effective_batch_size": config.batch_size * config.workers,
    }
    # `mlflow run` has already logged the MLproject parameters as the user typed them
    # ("9" where ccflow would write "9.0"), and MLflow rejects a changed value. A
    # resumed run keeps the values of its first attempt.
    already_logged = mlflow.active_run().data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in already_logged})
    mlflow.log_metric("effective_batch_size", config.batch_size * config.workers)
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


def _resolve_lr(config: TrainConfig, train_samples: list[Sample], run) -> float:
    """Return the learning rate to train with, running the range test for lr="auto"."""
    if config.lr != "auto":
        lr = float(config.lr)
    elif "lr_chosen" in mlflow.get_run(run.info.run_id).data.params:
        # A resumed run keeps the rate its first attempt chose.
        lr = float(mlflow.get_run(run.info.run_id).data.params["lr_chosen"])
    else:
        from ccflow.lrfind import find_lr, log_lr_find

        result = find_lr(config, train_samples)
        log_lr_find(result)
        lr = result.chosen_lr
    # Adam's rate is not scaled with the worker count: DDP averages the gradients of
    # batch_size * workers crops, and this rate applies to that average.
    mlflow.log_metric("effective_lr", lr)
    return lr


def _fit_with_ray(
    config: TrainConfig,
    train_samples: list[Sample],
    val_samples: list[Sample],
    run_id: str,
    lr: float,
    resume_checkpoint=None,
):
    """Run the Ray Train loop; return the best weights file and the last loop state."""
    import ray
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    if not ray.is_initialized():
        ray.init(address=config.ray_address, configure_logging=False)
    use_gpu = _resolve_use_gpu(config.use_gpu)
    cpus = int(ray.available_resources().get("CPU", 1))
    cpus_per_worker = max(1, cpus // config.workers)
    storage = _checkpoint_storage(config, run_id)
    if resume_checkpoint is not None:
        _log_missing_history(run_id, read_checkpoint_info(resume_checkpoint).history)

    loop_config = {
        "train": config,
        "train_samples": train_samples,
        "val_samples": val_samples,
        "run_id": run_id,
        "tracking_uri": _absolute_tracking_uri(),
        "threads": cpus_per_worker,
        "lr": lr,
        "resume_checkpoint": resume_checkpoint,
    }
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        # gloo runs on CPUs; NCCL is the backend for NVIDIA GPUs.
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=config.workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker},
        ),
        run_config=RunConfig(
            # A new name per attempt, so Ray starts afresh; the checkpoint of a resumed
            # run travels in the loop config (Ray Train 2.60 rejects resume_from_checkpoint).
            name=f"attempt-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage,
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
    )
    logger.info(
        "Training with %d Ray worker(s), %s, %d CPU thread(s) each; checkpoints in %s",
        config.workers, "GPU" if use_gpu else "CPU", cpus_per_worker, storage,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(
            f"Training run {run_id} reported no checkpoint; see the worker log above."
        )
    info = read_checkpoint_info(result.checkpoint)
    weights = copy_best_weights(result.checkpoint, Path(tempfile.mkdtemp(prefix="ccflow-best-")))
    logger.info("Best checkpoint: epoch %d, validation loss %.4f", info.best_epoch, info.best_loss)
    return weights, info


def _resolve_use_gpu(use_gpu: bool | str) -> bool:
    import ray

    if use_gpu != "auto":
        return bool(use_gpu)
    gpus = ray.cluster_resources().get("GPU", 0)
    logger.info("use_gpu=auto: the Ray cluster has %g GPU(s)", gpus)
    return gpus >= 1


def _checkpoint_storage(config: TrainConfig, run_id: str) -> str:
    """Return this run's checkpoint folder or URI and record it as a run tag."""
    root = config.storage_path or str(Path(tempfile.gettempdir()) / "ccflow-checkpoints")
    if "://" not in root:
        root = str(Path(root).expanduser().resolve())
    storage = f"{root.rstrip('/')}/ccflow-{run_id}"
    mlflow.set_tag(CHECKPOINT_STORAGE_TAG, storage)
    return storage


def _log_missing_history(run_id: str, history: dict[str, dict[str, float]]) -> None:
    """Log the checkpointed epochs that the killed attempt stored but had not logged yet."""
    client = MlflowClient()
    logged = {m.step for m in client.get_metric_history(run_id, "val_loss")}
    for epoch, metrics in sorted(history.items(), key=lambda item: int(item[0])):
        if int(epoch) not in logged:
            logger.info("Logging epoch %s from the checkpoint", epoch)
            log_epoch(client, run_id, int(epoch), metrics)


def _absolute_tracking_uri() -> str:
    # Ray workers may start in another working folder, so a relative SQLite path
    # (the MLflow default "sqlite:///mlflow.db") is made absolute for them.
    uri = mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix) :]).resolve())
    return uri


def _evaluate_and_log(config: TrainConfig, weights: Path, val_samples, test_samples):
    """Score the best weights on the validation and test images and log the results."""
    device = "cuda" if config.use_gpu is not False and torch.cuda.is_available() else "cpu"
    model = build_model(config.arch, config.base_width)
    model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    model.eval()
    mlflow.log_artifact(str(weights), artifact_path="checkpoints")

    evaluation, images, masks, probabilities = _final_evaluation(config, model, val_samples, device)
    # "eval_" keeps the final scores apart from the per-epoch "val_" histories.
    result_metrics = {f"eval_{k}": float(v) for k, v in evaluation.pooled.items()}
    mlflow.log_metrics(result_metrics)
    mlflow.log_table(evaluation.per_image, artifact_file="evaluation/val_per_image.json")
    _log_dataframe(evaluation.per_image, "evaluation/val_per_image.csv")
    _log_overlays(config, val_samples, images, masks, probabilities, evaluation.postprocess)

    if test_samples:
        test = _score_samples(model, test_samples, config, evaluation.postprocess, device)
        test_metrics = {f"test_{k}": float(v) for k, v in test.pooled.items()}
        mlflow.log_metrics(test_metrics)
        _log_dataframe(test.per_image, "evaluation/test_per_image.csv")
        result_metrics.update(test_metrics)
        logger.info("Test split: detection F1 %.3f on %d images", test.pooled["det_f1"], len(test_samples))
    return result_metrics, evaluation


def _final_evaluation(config: TrainConfig, model, val_samples: list[Sample], device: str):
    pairs = [load_pair(s) for s in val_samples]
    images, masks = [p[0] for p in pairs], [p[1] for p in pairs]
    probabilities = predict_probabilities(
        model, images, scale=config.scale, tile_size=config.tile_size, device=device
    )
    postprocess = config.postprocess
    if config.threshold == "auto":
        threshold = choose_threshold(probabilities, masks, postprocess)
        mlflow.log_param("threshold_chosen", threshold)
    else:
        threshold = float(config.threshold)
    postprocess = replace(postprocess, threshold=threshold)
    evaluation = score_probabilities([s.name for s in val_samples], probabilities, masks, postprocess)
    return evaluation, images, masks, probabilities


def _score_samples(model, samples: list[Sample], config: TrainConfig, postprocess, device) -> Evaluation:
    pairs = [load_pair(s) for s in samples]
    probabilities = predict_probabilities(
        model, [p[0] for p in pairs], scale=config.scale, tile_size=config.tile_size, device=device
    )
    return score_probabilities([s.name for s in samples], probabilities, [p[1] for p in pairs], postprocess)


def _log_overlays(config, samples, images, masks, probabilities, postprocess) -> None:
    from ccflow.plots import validation_overlay

    for sample, image, mask, probability in list(zip(samples, images, masks, probabilities))[: config.overlays]:
        overlay = validation_overlay(image, mask, label_cells(probability, postprocess))
        mlflow.log_image(overlay, f"overlays/val/{sample.name}.png")


def _log_training_curves(run_id: str) -> None:
    import matplotlib.pyplot as plt

    from ccflow.plots import training_curves

    client = MlflowClient()
    history = {
        name: [(m.step, m.value) for m in client.get_metric_history(run_id, name)]
        for name in CURVE_METRICS
    }
    figure = training_curves(history)
    mlflow.log_figure(figure, "plots/training_curves.png")
    plt.close(figure)


def _log_dataframe(frame, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / Path(artifact_file).name
        frame.to_csv(path, index=False)
        mlflow.log_artifact(str(path), artifact_path=str(Path(artifact_file).parent))


def _rounded(metrics: dict[str, float]) -> dict[str, str]:
    return {k: f"{v:.4f}" for k, v in metrics.items() if np.isfinite(v)}
