"""The ``ccflow`` command line: train, evaluate, count and make synthetic data."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated, Optional

import typer

from ccflow import REGISTERED_MODEL_NAME

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
    lr: Annotated[float, typer.Option(help="Adam learning rate.", rich_help_panel="Training")] = 1e-3,
    seed: Annotated[int, typer.Option(help="Seed of the split, crops and weights; same seed, same CPU run.", rich_help_panel="Training")] = 0,
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
    workers: Annotated[int, typer.Option(help="Ray Train workers.", rich_help_panel="Compute")] = 1,
    use_gpu: Annotated[bool, typer.Option(help="Train on GPUs, one per worker.", rich_help_panel="Compute")] = False,
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
        lr=lr,
        seed=seed,
        scale=scale,
        val_fraction=val_fraction,
        threshold=_parse_threshold(threshold),
        postprocess=PostprocessConfig(
            min_size_px=min_size, hole_size_px=hole_size, footprint_px=footprint
        ),
        workers=workers,
        use_gpu=use_gpu,
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
    input_dir: Annotated[Path, typer.Argument(help="Folder of PNG or TIFF images.")],
    output_dir: Annotated[Path, typer.Argument(help="Folder for counts.csv, cells.csv and overlays/.")],
    model: Annotated[
        str, typer.Option(help="MLflow model URI, e.g. models:/ccflow-cell-counter/3 or models:/ccflow-cell-counter@champion.")
    ] = f"models:/{REGISTERED_MODEL_NAME}@champion",
    overlays: Annotated[
        bool, typer.Option(help="Write an overlay PNG per image with outlines and the Grad-CAM heatmap.")
    ] = True,
    verbose: Annotated[bool, typer.Option(help="Log debug messages.")] = False,
) -> None:
    """Count the cells of every image in a folder into CSV files and overlays."""
    _configure_logging(verbose)
    from mlflow.exceptions import MlflowException

    from ccflow.count import count_folder
    from ccflow.errors import CcflowError
    from ccflow.registry import load_counter

    try:
        counter = load_counter(model)
        summary = count_folder(input_dir, output_dir, counter, overlays=overlays)
    except (CcflowError, MlflowException) as error:
        logger.error("%s", error)
        raise typer.Exit(code=2) from error
    typer.echo(
        f"Counted {summary.counted} of {summary.images} images ({summary.failed} failed, "
        f"{summary.cells} cells) into {summary.output_dir}"
    )


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


def main() -> None:
    """Run the ``ccflow`` console script."""
    app()


if __name__ == "__main__":
    main()
