"""Training throughput: ccflow's Ray Train loop against a plain PyTorch loop, on the same crops.

The three loops train the same network on the same ``CropDataset`` crops with the same
epoch function (``ccflow.train_loop._run_epoch``):

- plain: one process, no Ray, ``torch.set_num_threads(cpus)``;
- Ray, 1 worker: ``TorchTrainer`` with the loaders and DDP model of ``ccflow.train_loop``
  and ``cpus`` threads;
- Ray, 2 workers: the same, each worker with ``cpus // 2`` threads and half the crops.

Samples per second count training crops over the timed epochs only, after one warm-up
epoch; the start-up of ``TorchTrainer.fit`` is printed apart. Target: the Ray loop with
one worker reaches at least 90 % of the plain loop's samples per second.

Usage (from the repository root, on a quiet machine)::

    python benchmarks/training.py --data ../shared/data/fnc-yellow-sample
    python benchmarks/training.py --data ../shared/data/fnc-yellow-sample \\
        --base-width 4 --crop-size 256 --samples 8 --epochs 1   # a quick check
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ccflow.data import list_samples, load_pair
from ccflow.train import TrainConfig

logger = logging.getLogger("benchmarks.training")


def _loop(config: TrainConfig, pairs, epochs: int, threads: int, ray_loaders: bool) -> dict:
    """Train for 1 warm-up epoch plus ``epochs`` timed ones; return crops and seconds."""
    from ccflow.losses import build_loss
    from ccflow.model import build_model
    from ccflow.train_loop import _make_loaders, _run_epoch

    torch.set_num_threads(threads)
    torch.manual_seed(config.seed)
    if ray_loaders:
        import ray.train.torch

        train_loader, _, train_set = _make_loaders(config, pairs, pairs[:1])
        model = ray.train.torch.prepare_model(build_model(config.arch, config.base_width))
        device = ray.train.torch.get_device()
    else:
        from ccflow.data import CropDataset

        train_set = CropDataset([p[0] for p in pairs], [p[1] for p in pairs], crop_size=config.crop_size,
                                scale=config.scale, length=config.samples_per_epoch, augment=True,
                                seed=config.seed)
        train_loader = torch.utils.data.DataLoader(train_set, batch_size=config.batch_size, shuffle=False)
        model = build_model(config.arch, config.base_width)
        device = torch.device("cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    loss_fn = build_loss(config.loss)

    train_set.set_epoch(0)
    _run_epoch(model, train_loader, loss_fn, optimizer, device)
    crops, started = 0, time.perf_counter()
    for epoch in range(1, epochs + 1):
        train_set.set_epoch(epoch)
        crops += _run_epoch(model, train_loader, loss_fn, optimizer, device)[1]
    return {"crops": crops, "seconds": time.perf_counter() - started}


def _ray_worker(loop_config: dict) -> None:
    import ray.train

    pairs = [load_pair(s) for s in loop_config["samples"]]
    result = _loop(loop_config["config"], pairs, loop_config["epochs"], loop_config["threads"], True)
    # Ray Train 2.60 keeps reported metrics only together with a checkpoint.
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(result, checkpoint=checkpoint if ray.train.get_context().get_world_rank() == 0 else None)


def _ray_run(config: TrainConfig, samples, epochs: int, workers: int, cpus: int) -> dict:
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    # All workers run the same number of crops, so the slowest worker's time is the
    # loop's time; Ray Train 2.60 returns the metrics of rank 0.
    threads = max(1, cpus // workers)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config={"config": config, "samples": samples, "epochs": epochs, "threads": threads},
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=workers, resources_per_worker={"CPU": threads}),
        run_config=ray.train.RunConfig(storage_path=str(Path(tempfile.gettempdir()) / "ccflow-bench-ray")),
    )
    started = time.perf_counter()
    metrics = trainer.fit().metrics
    total = time.perf_counter() - started
    crops = metrics["crops"] * workers
    return {"samples_per_s": crops / metrics["seconds"], "loop_s": metrics["seconds"], "fit_s": total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="Folder with images/ and masks/.")
    parser.add_argument("--base-width", type=int, default=16, help="c-ResUnet width (16 = published).")
    parser.add_argument("--crop-size", type=int, default=512, help="Crop side in original pixels.")
    parser.add_argument("--batch-size", type=int, default=8, help="Crops per step and worker.")
    parser.add_argument("--samples", type=int, default=64, help="Crops per epoch over all workers.")
    parser.add_argument("--epochs", type=int, default=3, help="Timed epochs after one warm-up epoch.")
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPU threads in total.")
    parser.add_argument("--output", type=Path, help="Write the results to this JSON file.")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    import ray

    # Ray workers start in another working folder, so the path must be absolute.
    samples = list_samples(args.data.resolve(), require_masks=True)
    config = replace(TrainConfig(), data=args.data, base_width=args.base_width, crop_size=args.crop_size,
                     batch_size=args.batch_size, samples_per_epoch=args.samples, lr=1e-3)
    pairs = [load_pair(s) for s in samples]

    plain = _loop(config, pairs, args.epochs, args.cpus, ray_loaders=False)
    plain_rate = plain["crops"] / plain["seconds"]
    logger.info("plain PyTorch: %.2f samples/s", plain_rate)
    ray.init(num_cpus=args.cpus, configure_logging=False, include_dashboard=False)
    try:
        one = _ray_run(config, samples, args.epochs, 1, args.cpus)
        two = _ray_run(config, samples, args.epochs, 2, args.cpus)
    finally:
        ray.shutdown()

    results = {
        "machine": f"{platform.processor() or platform.machine()}, {args.cpus} CPU threads",
        "settings": vars(args) | {"data": str(args.data), "output": str(args.output)},
        "plain_samples_per_s": plain_rate,
        "ray_1_worker": one,
        "ray_2_workers": two,
        "ray_1_over_plain": one["samples_per_s"] / plain_rate,
        "ray_overhead_percent": 100 * (1 - one["samples_per_s"] / plain_rate),
        "ray_2_over_1": two["samples_per_s"] / one["samples_per_s"],
    }
    print(json.dumps(results, indent=2))
    print(
        f"Ray 1 worker / plain: {results['ray_1_over_plain']:.3f} "
        f"(overhead {results['ray_overhead_percent']:.1f} %, target < 10 %); "
        f"2 workers / 1 worker: {results['ray_2_over_1']:.3f}"
    )
    if args.output:
        args.output.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
