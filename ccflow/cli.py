"""The ``ccflow`` command line: train, evaluate, count, promote, validate images, monitor drift and make synthetic data."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from ccflow import DEFAULT_TOLERANCE_F1, DEFAULT_TOLERANCE_MAPE, REGISTERED_MODEL_NAME
from ccflow.energy import DEFAULT_COUNTRY
from ccflow.errors import CcflowError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Count cells in fluorescence microscopy images, with MLflow tracking and Ray.",
)
logger = logging.getLogger("ccflow")

DataOption = Annotated[
    Optional[str],
    typer.Option(
        help="Dataset folder with images/ and masks/ (PNG or TIFF). Empty or omitted: "
        "train on generated synthetic images.",
        rich_help_panel="Data",
    ),
]


def _configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


def data_folder(value: str | None) -> Path | None:
    """Return the dataset folder, or None for synthetic data when the value is empty.

    `mlflow run` passes the MLproject default ``data=""`` as an empty argument, which
    must select synthetic data rather than the current folder.
    """
    return Path(value) if value and value.strip() else None


def _parse_threshold(value: str) -> float | str:
    if value == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError as error:
        raise typer.BadParameter(
            f"{value!r} is not a number: use a value between 0 and 1, or 'auto'."
        ) from error


def _parse_lr(value: str) -> float | str:
    if value == "auto":
        return "auto"
    try:
        return float(value)
    except ValueError as error:
        raise typer.BadParameter(f"{value!r} is not a number: use a learning rate such as 0.001, or 'auto'.") from error


def _parse_use_gpu(value: str) -> bool | str:
    choices = {"auto": "auto", "true": True, "false": False}
    if value.lower() not in choices:
        raise typer.BadParameter(f"Invalid use_gpu {value!r}: use auto, true or false.")
    return choices[value.lower()]


WorkersOption = Annotated[
    int,
    typer.Option(
        help="Ray Train workers; each trains on its own share of the crops per epoch.",
        rich_help_panel="Compute",
    ),
]
UseGpuOption = Annotated[
    str,
    typer.Option(
        help="auto: one GPU per worker when the Ray cluster has GPUs (NCCL), else CPUs (gloo); or true / false.",
        rich_help_panel="Compute",
    ),
]
RayAddressOption = Annotated[
    Optional[str],
    typer.Option(help="Address of a running Ray cluster, such as 'auto'; omitted: start a local one.", rich_help_panel="Compute"),
]
StoragePathOption = Annotated[
    Optional[str],
    typer.Option(
        help="Folder, s3:// or gs:// URI for checkpoints; omitted: a folder under the system temporary folder.",
        rich_help_panel="Compute",
    ),
]
CountryOption = Annotated[
    str,
    typer.Option(
        help="ISO 3166-1 alpha-3 code of the electricity grid for the CO2 estimate; set it to where the machine runs.",
        rich_help_panel="Tracking",
    ),
]


@app.command()
def train(
    data: DataOption = None,
    loss: Annotated[
        str, typer.Option(help="Loss: dice, focal, focal_tversky, tversky or bce.", rich_help_panel="Model")
    ] = "focal",
    arch: Annotated[
        str,
        typer.Option(
            help="Network: c-resunet, or a segmentation-models-pytorch '<arch>-<encoder>' "
            "such as unet-resnet18 (random initial weights).",
            rich_help_panel="Model",
        ),
    ] = "c-resunet",
    base_width: Annotated[
        int, typer.Option(help="Channels of the first c-ResUnet level; 16 is the published width.", rich_help_panel="Model")
    ] = 16,
    epochs: Annotated[int, typer.Option(help="Maximum number of epochs.", rich_help_panel="Training")] = 40,
    patience: Annotated[
        int, typer.Option(help="Stop after this many epochs without a lower validation loss.", rich_help_panel="Training")
    ] = 8,
    max_minutes: Annotated[
        float, typer.Option(help="Wall-clock budget of the training loop, in minutes.", rich_help_panel="Training")
    ] = 9.0,
    crop_size: Annotated[
        int, typer.Option(help="Side of the random training crops, in original pixels.", rich_help_panel="Training")
    ] = 512,
    batch_size: Annotated[int, typer.Option(help="Crops per optimisation step and worker.", rich_help_panel="Training")] = 8,
    samples_per_epoch: Annotated[
        int, typer.Option(help="Random crops drawn per epoch.", rich_help_panel="Training")
    ] = 96,
    lr: Annotated[
        str,
        typer.Option(
            help="Adam learning rate, or 'auto' to pick it with a learning-rate range test "
            "before training (see `ccflow lr-find`).",
            rich_help_panel="Training",
        ),
    ] = "0.001",
    lr_schedule: Annotated[
        str,
        typer.Option(
            help="'plateau': halve the learning rate when the validation loss stalls for half "
            "the patience. 'cosine': decay it to 1 % of --lr by the last epoch or the time "
            "budget, whichever comes first.",
            rich_help_panel="Training",
        ),
    ] = "plateau",
    seed: Annotated[int, typer.Option(help="Seed of the split, crops and weights; same seed, same CPU run.", rich_help_panel="Training")] = 0,
    resume: Annotated[
        Optional[str],
        typer.Option(
            help="MLflow run id of a killed run: continue it from its last checkpoint, with the same settings.",
            rich_help_panel="Training",
        ),
    ] = None,
    test_data: Annotated[
        Optional[str],
        typer.Option(
            help="Labelled folder (images/ and masks/) scored after training and logged as test_* metrics.",
            rich_help_panel="Data",
        ),
    ] = None,
    scale: Annotated[
        float,
        typer.Option(
            help="Resampling factor before the network (0.5 = half resolution, 4x less "
            "compute). Counts are always reported in original pixels.",
            rich_help_panel="Training",
        ),
    ] = 0.5,
    val_fraction: Annotated[float, typer.Option(help="Share of images held out for validation.", rich_help_panel="Data")] = 0.25,
    threshold: Annotated[
        str,
        typer.Option(
            help="Probability threshold for a cell pixel, or 'auto' to pick the one with "
            "the best validation detection F1. Raise it to find fewer cells.",
            rich_help_panel="Post-processing",
        ),
    ] = "0.5",
    min_size: Annotated[
        int, typer.Option(help="Objects smaller than this many original pixels are dropped.", rich_help_panel="Post-processing")
    ] = 200,
    hole_size: Annotated[
        int, typer.Option(help="Holes smaller than this many original pixels are filled.", rich_help_panel="Post-processing")
    ] = 50,
    footprint: Annotated[
        int,
        typer.Option(
            help="Watershed peak footprint in original pixels; lower it to split more touching cells.",
            rich_help_panel="Post-processing",
        ),
    ] = 40,
    workers: WorkersOption = 1,
    use_gpu: UseGpuOption = "auto",
    ray_address: RayAddressOption = None,
    storage_path: StoragePathOption = None,
    country: CountryOption = DEFAULT_COUNTRY,
    experiment: Annotated[str, typer.Option(help="MLflow experiment name.", rich_help_panel="Tracking")] = "ccflow",
    register: Annotated[
        bool, typer.Option(help="Register the model as a new version in the MLflow registry.", rich_help_panel="Tracking")
    ] = True,
    model_name: Annotated[str, typer.Option(help="Registered model name.", rich_help_panel="Tracking")] = REGISTERED_MODEL_NAME,
    verbose: Annotated[bool, typer.Option(help="Log debug messages.")] = False,
) -> None:
    """Train a model, evaluate it on held-out images and register it in MLflow."""
    _configure_logging(verbose)
    from ccflow.postprocess import PostprocessConfig
    from ccflow.train import TrainConfig
    from ccflow.train import train as run_training

    config = TrainConfig(
        data=data_folder(data),
        arch=arch,
        base_width=base_width,
        loss=loss,
        epochs=epochs,
        patience=patience,
        max_minutes=max_minutes,
        crop_size=crop_size,
        batch_size=batch_size,
        samples_per_epoch=samples_per_epoch,
        lr=_parse_lr(lr),
        lr_schedule=lr_schedule,
        seed=seed,
        scale=scale,
        val_fraction=val_fraction,
        threshold=_parse_threshold(threshold),
        postprocess=PostprocessConfig(
            min_size_px=min_size, hole_size_px=hole_size, footprint_px=footprint
        ),
        workers=workers,
        use_gpu=_parse_use_gpu(use_gpu),
        ray_address=ray_address or None,
        storage_path=storage_path or None,
        resume=resume or None,
        test_data=data_folder(test_data),
        country=country,
        experiment=experiment,
        register=register,
        model_name=model_name,
    )
    result = _train_or_exit(run_training, config)
    typer.echo(json.dumps({"run_id": result.run_id, "model_uri": result.model_uri, **result.metrics}, indent=2))


def _train_or_exit(run_training, config):
    from ccflow.errors import CcflowError

    try:
        return run_training(config)
    except (CcflowError, ValueError) as error:
        logger.error("%s", error)
        raise typer.Exit(code=2) from error


@app.command()
def evaluate(
    data: Annotated[Path, typer.Argument(help="Labelled folder with images/ and masks/.")],
    model: Annotated[str, typer.Option(help="MLflow model URI, e.g. models:/ccflow-cell-counter@champion.")],
    output: Annotated[
        Optional[Path], typer.Option(help="Write the per-image metrics to this CSV file.")
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Log debug messages.")] = False,
) -> None:
    """Score a registered model on a labelled folder: detection, segmentation and count errors."""
    _configure_logging(verbose)
    from ccflow.data import list_samples, load_pair
    from ccflow.evaluate import predict_probabilities, score_probabilities
    from ccflow.registry import load_counter

    counter = load_counter(model)
    samples = list_samples(data, require_masks=True)
    pairs = [load_pair(s) for s in samples]
    probabilities = predict_probabilities(
        counter.model, [p[0] for p in pairs], scale=counter.scale, tile_size=counter.tile_size
    )
    evaluation = score_probabilities(
        [s.name for s in samples], probabilities, [p[1] for p in pairs], counter.postprocess
    )
    if output:
        evaluation.per_image.to_csv(output, index=False)
    typer.echo(json.dumps(evaluation.pooled, indent=2))


@app.command()
def count(
    input_location: Annotated[
        str, typer.Argument(help="Folder, gs://bucket/prefix or s3://bucket/prefix of PNG or TIFF images.")
    ],
    output_location: Annotated[
        str,
        typer.Argument(
            help="Folder or bucket prefix for counts.csv, cells.csv, overlays/, ledger.csv and runs/."
        ),
    ],
    model: Annotated[
        str, typer.Option(help="MLflow model URI, e.g. models:/ccflow-cell-counter/3 or models:/ccflow-cell-counter@champion.")
    ] = f"models:/{REGISTERED_MODEL_NAME}@champion",
    overlays: Annotated[
        bool, typer.Option(help="Write an overlay PNG per image with outlines and the Grad-CAM heatmap.")
    ] = True,
    recount: Annotated[
        bool, typer.Option(help="Ignore the ledger and count every image again; replaces the CSV files.")
    ] = False,
    validate: Annotated[
        bool,
        typer.Option(help="Check each image against validation/counting_images.json; invalid images are not counted."),
    ] = True,
    drift_threshold: Annotated[
        float,
        typer.Option(help="Flag the run when its overall drift (largest per-feature PSI) exceeds this; raise it to flag fewer runs."),
    ] = 0.25,
    concurrency: Annotated[
        Optional[int],
        typer.Option(help="Counting actors, each loading the model once. Default: one per GPU share, or per CPU.", rich_help_panel="Compute"),
    ] = None,
    num_gpus: Annotated[float, typer.Option(help="GPUs per actor; 0 counts on CPUs.", rich_help_panel="Compute")] = 0.0,
    cpus_per_actor: Annotated[
        float, typer.Option(help="CPUs per actor, also its PyTorch threads.", rich_help_panel="Compute")
    ] = 1.0,
    batch_size: Annotated[int, typer.Option(help="Images per batch handed to an actor.", rich_help_panel="Compute")] = 4,
    s3_endpoint_url: Annotated[
        Optional[str],
        typer.Option(help="Endpoint of an S3-compatible store (default: AWS_ENDPOINT_URL, else AWS).", rich_help_panel="Storage"),
    ] = None,
    experiment: Annotated[
        str, typer.Option(help="MLflow experiment of the job's run; empty logs no run.", rich_help_panel="Tracking")
    ] = "ccflow-counting",
    energy: Annotated[
        bool, typer.Option(help="Measure energy and CO2 with CodeCarbon.", rich_help_panel="Tracking")
    ] = True,
    verbose: Annotated[bool, typer.Option(help="Log debug messages.")] = False,
) -> None:
    """Count the new and changed images under a folder or bucket prefix with a Ray Data job.

    Exits with 0 when every image was counted, 1 when some failed or were invalid, 2 when
    the job failed.
    """
    _configure_logging(verbose)
    from ccflow.batch import CountJobConfig, manifest_to_text, run_count_job

    config = CountJobConfig(
        input=input_location,
        output=output_location,
        model_uri=model,
        overlays=overlays,
        concurrency=concurrency,
        num_gpus=num_gpus,
        cpus_per_actor=cpus_per_actor,
        batch_size=batch_size,
        recount=recount,
        s3_endpoint_url=s3_endpoint_url or None,
        experiment=experiment or None,
        energy=energy,
        validate=validate,
        drift_threshold=drift_threshold,
    )
    manifest = _count_or_exit(run_count_job, config)
    typer.echo(manifest_to_text(manifest))
    if manifest["images_failed"] or manifest["images_invalid"]:
        raise typer.Exit(code=1)


def _count_or_exit(run_count_job, config):
    from mlflow.exceptions import MlflowException

    from ccflow.errors import CcflowError

    try:
        return run_count_job(config)
    except (CcflowError, MlflowException, ValueError) as error:
        logger.error("%s", error)
        raise typer.Exit(code=2) from error


@app.command()
def promote(
    version: Annotated[str, typer.Argument(help="Candidate version of the registered model, e.g. 3.")],
    data: Annotated[
        Optional[Path],
        typer.Option(
            help="Held-out labelled folder with images/ and masks/ that both versions are "
            "scored on. Default: the folder in $CCFLOW_PROMOTION_DATA.",
            envvar="CCFLOW_PROMOTION_DATA",
            show_envvar=False,
            rich_help_panel="Gate",
        ),
    ] = None,
    tolerance_f1: Annotated[
        float,
        typer.Option(
            help="Largest allowed drop of detection F1 against the champion (F1 units); "
            "raise it to accept slightly worse candidates.",
            rich_help_panel="Gate",
        ),
    ] = DEFAULT_TOLERANCE_F1,
    tolerance_mape: Annotated[
        float,
        typer.Option(
            help="Largest allowed rise of count MAPE against the champion, in percentage points.",
            rich_help_panel="Gate",
        ),
    ] = DEFAULT_TOLERANCE_MAPE,
    force: Annotated[
        bool, typer.Option(help="Promote even when the gate rejects the candidate; needs --reason.", rich_help_panel="Override")
    ] = False,
    reason: Annotated[
        Optional[str], typer.Option(help="Why the gate is overridden; recorded on the version.", rich_help_panel="Override")
    ] = None,
    model_name: Annotated[str, typer.Option(help="Registered model name.")] = REGISTERED_MODEL_NAME,
    verbose: Annotated[bool, typer.Option(help="Log debug messages.")] = False,
) -> None:
    """Move the champion alias to VERSION if it scores at least as well as the champion.

    Exit status 0 when the version is champion afterwards, 1 when the gate rejected it,
    2 on invalid input.
    """
    _configure_logging(verbose)
    from mlflow.exceptions import MlflowException

    from ccflow.errors import CcflowError
    from ccflow.promote import promote as run_promotion

    if data is None:
        logger.error("No evaluation data: pass --data FOLDER or set CCFLOW_PROMOTION_DATA.")
        raise typer.Exit(code=2)
    try:
        result = run_promotion(
            version,
            data,
            model_name=model_name,
            tolerance_f1=tolerance_f1,
            tolerance_mape=tolerance_mape,
            force=force,
            reason=reason,
        )
    except (CcflowError, MlflowException) as error:
        logger.error("%s", error)
        raise typer.Exit(code=2) from error
    summary = {
        "model": model_name,
        "version": result.version,
        "decision": result.decision,
        "reason": result.reason,
        "previous_champion": result.champion_version,
        "candidate": {k: result.candidate_metrics[k] for k in ("det_f1", "count_mape") if k in result.candidate_metrics},
        "champion": {k: result.champion_metrics[k] for k in ("det_f1", "count_mape") if k in result.champion_metrics},
        "data_fingerprint": result.data_fingerprint,
        "run_id": result.run_id,
    }
    typer.echo(json.dumps(summary, indent=2))
    if result.decision == "rejected":
        raise typer.Exit(code=1)


@app.command()
def synth(
    dest: Annotated[Path, typer.Argument(help="Folder to write images/ and masks/ into.")],
    images: Annotated[int, typer.Option(help="Number of images.")] = 16,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Write a synthetic fluorescence dataset with exact masks."""
    _configure_logging(False)
    from ccflow.synthetic import write_synthetic_dataset

    write_synthetic_dataset(dest, n_images=images, seed=seed)
    typer.echo(f"Wrote {images} synthetic images and masks to {dest}")


@app.command()
def validate(
    path: Annotated[
        Path, typer.Argument(help="Folder of images, or a dataset folder with images/ and masks/ (checked as training pairs).")
    ],
    output: Annotated[
        Path, typer.Option(help="Folder for validation.csv, summary.json and data_docs/.")
    ] = Path("validation-report"),
    mlflow_log: Annotated[
        bool,
        typer.Option(
            "--mlflow/--no-mlflow",
            help="Log the report and GX data docs to MLflow (the active run, or a new run in "
            "the experiment ccflow-validation).",
        ),
    ] = True,
    verbose: Annotated[bool, typer.Option(help="Log debug messages.")] = False,
) -> None:
    """Check images against the suites in validation/; exit code 1 when any is invalid."""
    _configure_logging(verbose)
    from ccflow.errors import CcflowError
    from ccflow.validation import validate_folder

    try:
        summary = validate_folder(path, output, log_to_mlflow=mlflow_log)
    except CcflowError as error:
        logger.error("%s", error)
        raise typer.Exit(code=2) from error
    typer.echo(json.dumps(summary.to_dict(), indent=2))
    if summary.invalid:
        raise typer.Exit(code=1)


@app.command()
def monitor(
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the counting runs.")] = "ccflow-counting",
    last: Annotated[int, typer.Option(help="Number of most recent runs to show.")] = 20,
    plot: Annotated[Path, typer.Option(help="PNG file for the drift and count trend plot.")] = Path("monitor.png"),
    threshold: Annotated[
        float, typer.Option(help="Drift threshold drawn on the plot (PSI); 0.25 is ccflow's default.")
    ] = 0.25,
) -> None:
    """Print the drift and count trend of recent counting runs and plot it."""
    _configure_logging(False)
    from ccflow.monitor import format_trend, plot_trend, recent_counting_runs

    try:
        runs = recent_counting_runs(experiment, last)
    except ValueError as error:
        logger.error("%s", error)
        raise typer.Exit(code=2) from error
    typer.echo(format_trend(runs))
    if not runs.empty:
        plot_trend(runs, plot, threshold)
        typer.echo(f"Plot: {plot}")


@app.command("lr-find")
def lr_find(
    data: DataOption = None,
    loss: Annotated[str, typer.Option(help="Loss: dice, focal, focal_tversky, tversky or bce.")] = "focal",
    arch: Annotated[str, typer.Option(help="Network, as for `ccflow train`.")] = "c-resunet",
    base_width: Annotated[int, typer.Option(help="Channels of the first c-ResUnet level.")] = 16,
    crop_size: Annotated[int, typer.Option(help="Side of the random training crops, in original pixels.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Crops per step.")] = 8,
    scale: Annotated[float, typer.Option(help="Resampling factor before the network.")] = 0.5,
    seed: Annotated[int, typer.Option(help="Seed of the split, crops and weights.")] = 0,
    steps: Annotated[int, typer.Option(help="Steps of the range test; more steps give a smoother curve.")] = 60,
    min_lr: Annotated[float, typer.Option(help="First learning rate of the sweep.")] = 1e-6,
    max_lr: Annotated[float, typer.Option(help="Last learning rate of the sweep.")] = 1.0,
    experiment: Annotated[str, typer.Option(help="MLflow experiment of the lr-find run.")] = "ccflow",
    verbose: Annotated[bool, typer.Option(help="Log debug messages.")] = False,
) -> None:
    """Run a learning-rate range test and log its plot and chosen rate to an MLflow run."""
    _configure_logging(verbose)
    import mlflow

    from ccflow.data import list_samples, split_samples
    from ccflow.lrfind import find_lr, log_lr_find
    from ccflow.train import TrainConfig, resolve_data

    config = TrainConfig(
        data=data_folder(data), loss=loss, arch=arch, base_width=base_width, crop_size=crop_size,
        batch_size=batch_size, scale=scale, seed=seed,
    )
    try:
        config.validate()
        samples = list_samples(resolve_data(config), require_masks=True)
        train_samples, _ = split_samples(samples, config.val_fraction, config.seed)
        result = find_lr(config, train_samples, min_lr=min_lr, max_lr=max_lr, steps=steps)
    except (ValueError, CcflowError) as error:
        logger.error("%s", error)
        raise typer.Exit(code=2) from error
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name="lr-find") as run:
        mlflow.log_params({k: v for k, v in config.to_params().items() if k in ("data", "loss", "arch", "base_width", "crop_size", "batch_size", "scale", "seed")})
        log_lr_find(result)
    typer.echo(json.dumps({"run_id": run.info.run_id, "lr": result.chosen_lr, "min_loss_lr": result.min_loss_lr}, indent=2))


@app.command()
def sweep(
    losses: Annotated[str, typer.Option(help="Comma-separated losses to compare, such as dice,focal.")] = "dice,focal",
    seeds: Annotated[int, typer.Option(help="Seeds per loss (0 .. seeds-1); more seeds, tighter standard deviations.")] = 3,
    data: DataOption = None,
    test_data: Annotated[
        Optional[str], typer.Option(help="Labelled test folder; when given, the summary scores come from it.")
    ] = None,
    arch: Annotated[str, typer.Option(help="Network, as for `ccflow train`.")] = "c-resunet",
    base_width: Annotated[int, typer.Option(help="Channels of the first c-ResUnet level.")] = 16,
    epochs: Annotated[int, typer.Option(help="Maximum number of epochs per run.")] = 40,
    patience: Annotated[int, typer.Option(help="Stop a run after this many epochs without a lower validation loss.")] = 8,
    max_minutes: Annotated[float, typer.Option(help="Wall-clock budget of each run's training loop, in minutes.")] = 9.0,
    crop_size: Annotated[int, typer.Option(help="Side of the random training crops, in original pixels.")] = 512,
    batch_size: Annotated[int, typer.Option(help="Crops per optimisation step and worker.")] = 8,
    samples_per_epoch: Annotated[int, typer.Option(help="Random crops drawn per epoch.")] = 96,
    lr: Annotated[str, typer.Option(help="Adam learning rate, or 'auto' for a range test per run.")] = "0.001",
    scale: Annotated[float, typer.Option(help="Resampling factor before the network.")] = 0.5,
    threshold: Annotated[str, typer.Option(help="Probability threshold, or 'auto'.")] = "0.5",
    workers: WorkersOption = 1,
    use_gpu: UseGpuOption = "auto",
    ray_address: RayAddressOption = None,
    storage_path: StoragePathOption = None,
    country: CountryOption = DEFAULT_COUNTRY,
    experiment: Annotated[str, typer.Option(help="MLflow experiment name.")] = "ccflow-sweep",
    verbose: Annotated[bool, typer.Option(help="Log debug messages.")] = False,
) -> None:
    """Train every loss with every seed as child runs of one parent run and summarise them."""
    _configure_logging(verbose)
    from ccflow.sweep import parse_losses, render_table, run_sweep
    from ccflow.train import TrainConfig

    try:
        loss_names = parse_losses(losses)
        base = TrainConfig(
            data=data_folder(data), test_data=data_folder(test_data), arch=arch, base_width=base_width,
            epochs=epochs, patience=patience, max_minutes=max_minutes, crop_size=crop_size,
            batch_size=batch_size, samples_per_epoch=samples_per_epoch, lr=_parse_lr(lr), scale=scale,
            threshold=_parse_threshold(threshold), workers=workers, use_gpu=_parse_use_gpu(use_gpu),
            ray_address=ray_address or None, storage_path=storage_path or None, country=country,
            experiment=experiment, register=False,
        )
        base.validate()
        result = run_sweep(base, loss_names, seeds)
    except (ValueError, CcflowError) as error:
        logger.error("%s", error)
        raise typer.Exit(code=2) from error
    typer.echo(f"Parent run {result.parent_run_id}")
    typer.echo(render_table(result.summary).to_string(index=False))


data_app = typer.Typer(no_args_is_help=True, help="Download and prepare datasets.")
app.add_typer(data_app, name="data")


@data_app.command("fetch-fnc")
def fetch_fnc(
    dest: Annotated[Path, typer.Argument(help="Folder to write trainval/ and test/ into, each with images/ and masks/.")],
    collection: Annotated[str, typer.Option(help="Collection of the archive: yellow, green or red.")] = "yellow",
    url: Annotated[Optional[str], typer.Option(help="Download from this URL instead, such as a mirror.")] = None,
    sha256: Annotated[Optional[str], typer.Option(help="Expected sha256 of the file at --url.")] = None,
    keep_archive: Annotated[bool, typer.Option(help="Keep the verified zip in DEST/.download/.")] = False,
) -> None:
    """Download the Fluorescent Neuronal Cells v2 archive, verify it and lay it out for ccflow."""
    _configure_logging(False)
    from ccflow.fetch import fetch_fnc as run_fetch

    try:
        result = run_fetch(collection, dest, url=url, sha256=sha256, keep_archive=keep_archive)
    except (ValueError, CcflowError) as error:
        logger.error("%s", error)
        raise typer.Exit(code=2) from error
    typer.echo(json.dumps({"dest": str(result.dest), "pairs": result.pairs}, indent=2))


def main() -> None:
    """Run the ``ccflow`` console script."""
    app()


if __name__ == "__main__":
    main()
