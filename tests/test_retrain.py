"""The retraining job: triggered by flagged counting runs, registers a challenger only."""

import importlib.util
import json
import shutil

import mlflow
import pytest

from ccflow import CHALLENGER_ALIAS, CHAMPION_ALIAS
from ccflow.drift import DriftReport, log_drift

from tests.conftest import REPO_ROOT, TINY_TRAINING

MODEL_NAME = "ccflow-retrain-test"
COUNTING_EXPERIMENT = "retrain-test-counting"


def load_job():
    spec = importlib.util.spec_from_file_location("retrain_on_drift", REPO_ROOT / "jobs" / "retrain_on_drift.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_pairs(source, destination, names):
    for folder in ("images", "masks"):
        (destination / folder).mkdir(parents=True)
        for name in names:
            shutil.copy(source / folder / f"{name}.png", destination / folder / f"{name}.png")
    return destination


def add_counting_run(client, experiment_id, flagged: bool, start: int) -> str:
    run = client.create_run(experiment_id, start_time=start)
    overall = 0.9 if flagged else 0.02
    report = DriftReport(per_feature={"hue": overall}, overall=overall, flagged=flagged, method="psi", threshold=0.25)
    log_drift(report, client, run.info.run_id)
    client.set_terminated(run.info.run_id)
    return run.info.run_id


@pytest.fixture
def champion(tmp_path, fnc_sample_dir, mlflow_backend):
    """Register version 1 of the test model, trained on the base folder, as champion."""
    client = mlflow.MlflowClient()
    base = copy_pairs(fnc_sample_dir, tmp_path / "base", ["Mar19bS1C4R2_LHr_200x", "Mar23bS1C2R3_VLPAGr_200x"])
    with mlflow.start_run(experiment_id=client.get_experiment_by_name(TINY_TRAINING["experiment"]).experiment_id) as run:
        mlflow.log_param("data_dir", str(base.resolve()))
        mlflow.log_dict({"placeholder": True}, "model/placeholder.json")
    client.create_registered_model(MODEL_NAME)
    version = client.create_model_version(MODEL_NAME, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id)
    client.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, version.version)
    return str(version.version)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_flagged_runs_retrain_a_challenger(tmp_path, fnc_sample_dir, champion, ray_cluster, capsys):
    job = load_job()
    client = mlflow.MlflowClient()
    new_data = copy_pairs(fnc_sample_dir, tmp_path / "new", ["Mar24bS1C2R3_LHl_200x", "Mar32bS2C2R2_DMl_200x"])
    experiment_id = client.create_experiment(COUNTING_EXPERIMENT, artifact_location=(tmp_path / "c").as_uri())

    def job_args(workdir_name: str) -> list[str]:
        return [
            str(new_data),
            "--counting-experiment", COUNTING_EXPERIMENT,
            "--last", "2",
            "--model-name", MODEL_NAME,
            "--workdir", str(tmp_path / workdir_name),
            *[f"--train={key}={value}" for key, value in TINY_TRAINING.items()],
        ]

    # The newest run is not flagged: no retraining.
    add_counting_run(client, experiment_id, flagged=True, start=1_700_000_000_000)
    add_counting_run(client, experiment_id, flagged=False, start=1_700_000_100_000)
    assert job.main(job_args("combined")) == 0
    assert json.loads(capsys.readouterr().out)["retrained"] is False
    assert len(client.search_model_versions(f"name = '{MODEL_NAME}'")) == 1

    # The two newest runs are flagged: one tiny training on base plus new data.
    triggers = [add_counting_run(client, experiment_id, True, 1_700_000_200_000 + i * 1000) for i in range(2)]
    assert job.main(job_args("combined")) == 0
    summary = json.loads(capsys.readouterr().out)

    assert summary["retrained"] is True
    challenger = client.get_model_version_by_alias(MODEL_NAME, CHALLENGER_ALIAS)
    assert str(challenger.version) == summary["model_version"]
    assert str(challenger.version) != champion
    assert str(client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version) == champion
    assert set(challenger.tags[job.TRIGGER_TAG].split(",")) == set(triggers)
    run = client.get_run(summary["run_id"])
    assert run.data.params["n_train_images"] == "3"
    assert run.data.params["n_val_images"] == "1"
    assert run.data.tags["retrain_base_data"] == str((tmp_path / "base").resolve())
    assert sorted(p.name for p in (tmp_path / "combined" / "images").iterdir()) == sorted(
        p.name for p in (fnc_sample_dir / "images").iterdir()
    )

    # The same new data does not train a second challenger.
    assert job.main(job_args("again")) == 0
    assert "already trained" in json.loads(capsys.readouterr().out)["reason"]
    assert len(client.search_model_versions(f"name = '{MODEL_NAME}'")) == 2


def test_train_options_are_typed():
    job = load_job()

    settings = job.parse_train_options(["epochs=3", "lr=auto", "scale=0.25", "register=false", "experiment=x"])

    assert settings == {"epochs": 3, "lr": "auto", "scale": 0.25, "register": False, "experiment": "x"}
    with pytest.raises(ValueError, match="data"):
        job.parse_train_options(["data=/tmp"])


def test_unscored_runs_do_not_break_streak(mlflow_backend):
    client = mlflow.MlflowClient()
    experiment_id = client.create_experiment("retrain-test-unscored")
    add_counting_run(client, experiment_id, flagged=True, start=1_000)
    # A nightly run with nothing new to count logs no drift at all.
    unscored = client.create_run(experiment_id, start_time=2_000)
    client.set_terminated(unscored.info.run_id)
    add_counting_run(client, experiment_id, flagged=True, start=3_000)

    flagged, run_ids = load_job().latest_runs_flagged(client, "retrain-test-unscored", last=2)

    assert flagged
    assert unscored.info.run_id not in run_ids
    assert len(run_ids) == 2
