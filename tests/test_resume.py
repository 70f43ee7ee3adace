"""Kill a training run after its first checkpoint, resume it, and check the epoch history."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import mlflow
import pytest

from ccflow.train import TrainConfig, train
from tests.conftest import REPO_ROOT, TINY_TRAINING

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EPOCHS = 3
# The killed and the resumed attempt must train with equal settings.
SETTINGS = {**TINY_TRAINING, "epochs": EPOCHS, "patience": EPOCHS, "register": False,
            "system_metrics": False, "overlays": 0}

TRAINING_SCRIPT = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    import ray
    from ccflow.train import TrainConfig, train

    ray.init(address=sys.argv[1], configure_logging=False)
    train(TrainConfig(data=Path(sys.argv[2]), storage_path=sys.argv[3], **{settings}))
    """
)


def _wait_for(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"Timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.5)


def _first_checkpoint(storage):
    return next(storage.glob("ccflow-*/attempt-*/checkpoint_epoch_*/checkpoint.json"), None)


# The plateau scheduler has a state that the checkpoint must carry. The cosine schedule
# follows the epoch and elapsed time that the loop state carries.
@pytest.mark.parametrize("schedule", ["cosine", "plateau"])
def test_killed_run_resumes_without_gap(schedule, fnc_sample_dir, mlflow_backend, ray_cluster, tmp_path):
    import ray

    storage = tmp_path / "checkpoints"
    settings = {**SETTINGS, "lr_schedule": schedule}
    script = TRAINING_SCRIPT.format(settings=repr(settings))
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_backend, "PYTHONPATH": str(REPO_ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    process = subprocess.Popen(
        [sys.executable, "-c", script, ray.get_runtime_context().gcs_address,
         str(fnc_sample_dir), str(storage)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        _wait_for(lambda: _first_checkpoint(storage) is not None or process.poll() is not None,
                  600, "the first checkpoint")
        assert process.poll() is None, "training ended before it could be killed"
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    run_id = _first_checkpoint(storage).parts[-4].removeprefix("ccflow-")
    # Ray frees the killed driver's workers once it notices the driver is gone.
    _wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, 120, "Ray to free the CPUs")
    killed_steps = [m.step for m in mlflow.MlflowClient().get_metric_history(run_id, "val_loss")]

    result = train(TrainConfig(data=fnc_sample_dir, storage_path=str(storage), resume=run_id, **settings))

    client = mlflow.MlflowClient()
    assert result.run_id == run_id
    assert len(killed_steps) < EPOCHS
    for key in ("train_loss", "val_loss", "val_det_f1", "lr"):
        steps = [m.step for m in client.get_metric_history(run_id, key)]
        assert sorted(steps) == list(range(EPOCHS)), key
    assert client.get_run(run_id).info.status == "FINISHED"
    assert len(list(storage.glob(f"ccflow-{run_id}/attempt-*"))) == 2
    lrs = [m.value for m in sorted(client.get_metric_history(run_id, "lr"), key=lambda m: m.step)]
    assert lrs[0] == pytest.approx(1e-3)
    if schedule == "cosine":
        assert lrs[0] > lrs[1] > lrs[2]
    else:
        assert lrs[0] >= lrs[1] >= lrs[2]


def test_resume_rejects_changed_loss(fnc_sample_dir, mlflow_backend, tmp_path):
    mlflow.set_experiment(TINY_TRAINING["experiment"])
    with mlflow.start_run() as run:
        mlflow.log_params({"loss": "dice", "seed": 0})
    config = TrainConfig(data=fnc_sample_dir, resume=run.info.run_id, **{**SETTINGS, "loss": "focal"})

    with pytest.raises(Exception, match="loss"):
        train(config)
