"""Faults injected for real into a real sweep (local Ray cluster, SQLite MLflow, tiny model)."""

import os
import signal
import subprocess
import sys
import time

from mlflow import MlflowClient

from tests.conftest import SPACE, run_cli

SMALL = ["trial.epochs=1", "trial.max_eval_examples=100", "test_max_examples=200", "scheduler.type=none"]


def trial_runs(uri: str, sweep: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quickstart")
    parent = client.search_runs([experiment.experiment_id], f"tags.`runner.sweep` = '{sweep}'")
    assert len(parent) == 1
    return client, client.search_runs(
        [experiment.experiment_id],
        f"tags.`runner.sweep_run_id` = '{parent[0].info.run_id}' and tags.`runner.kind` = 'trial'")


def test_a_diverging_trial_fails_alone_and_is_never_promoted(tiny_model, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run_cli("tune", SPACE, "name=nan", f"storage_path={tmp_path / 'ray'}", f"tracking_uri={uri}",
                     "num_samples=1", "max_failures=0", *SMALL,
                     "space={learning_rate: {grid: [3.0e-3, 1.0e+6]}, n_samples: {choice: [300]}}",
                     cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    client, runs = trial_runs(uri, "nan")
    by_lr = {float(run.data.params["learning_rate"]): run for run in runs}
    failed, good = by_lr[1e6], by_lr[3e-3]
    assert failed.info.status == "FAILED" and failed.data.tags["runner.trial_status"] == "FAILED"
    assert "loss became nan" in failed.data.tags["runner.error"].lower() or \
        "loss became inf" in failed.data.tags["runner.error"].lower()
    assert good.info.status == "FINISHED"
    versions = client.search_model_versions("name = 'tiny-blip2-easy-vqa'")
    assert [v.run_id for v in versions] == [good.info.run_id]


def test_killed_sweep_driver_resumes_without_rerunning_or_duplicating(tiny_model, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["tune", SPACE, "name=killed", f"storage_path={tmp_path / 'ray'}", f"tracking_uri={uri}",
            "num_samples=4", "max_concurrent_trials=1", *SMALL,
            "space={learning_rate: {choice: [3.0e-3]}, n_samples: {choice: [200, 300, 400, 500]}}"]
    driver = subprocess.Popen([sys.executable, "-m", "runner.cli", *args], cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.time() + 600
    finished = []
    while time.time() < deadline and not finished:
        time.sleep(3)
        if (tmp_path / "mlflow.db").exists():
            try:
                _, runs = trial_runs(uri, "killed")
            except AssertionError:
                continue
            finished = [run for run in runs if run.info.status == "FINISHED"]
    assert finished, "no trial finished within 10 minutes"
    os.killpg(driver.pid, signal.SIGKILL)  # the driver and everything it started
    driver.wait(30)
    first = finished[0]

    result = run_cli(*args, "--resume", cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    client, runs = trial_runs(uri, "killed")
    assert len(runs) == 4  # no trial run created twice
    assert all(run.info.status == "FINISHED" for run in runs)
    again = client.get_run(first.info.run_id)
    assert again.info.end_time == first.info.end_time  # the finished trial was not rerun
    for run in runs:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert len(steps) == len(set(steps))
    assert len(client.search_model_versions("name = 'tiny-blip2-easy-vqa'")) == 1  # promoted once

