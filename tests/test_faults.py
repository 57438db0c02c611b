"""Faults injected for real into one real sweep (the `faults` fixture in conftest.py: local Ray cluster,
SQLite MLflow, the tiny model). Each test asserts on its own part of the outcome."""

import json
import re

import pytest
from mlflow import MlflowClient

from runner.train import checkpoint
from tests.conftest import FAULT_LRS, MODEL

pytestmark = pytest.mark.slow


def trial_runs(uri: str) -> dict[str, object]:
    """The sweep's trial runs, by the role their learning rate gives them (FAULT_LRS)."""
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id], "tags.`runner.kind` = 'trial'")
    roles = {lr: role for role, lr in FAULT_LRS.items()}
    return {roles[float(run.data.params["learning_rate"])]: run for run in runs}


def test_every_trial_has_one_run_and_each_epoch_once(faults):
    runs = trial_runs(faults["uri"])
    assert sorted(runs) == sorted(FAULT_LRS)  # no run created twice, by the worker kill or the resume
    client = MlflowClient(faults["uri"])
    for run in runs.values():
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")]
        assert len(steps) == len(set(steps))


def test_killed_train_worker_restarts_its_trial_from_the_last_checkpoint(faults):
    text = faults["first_driver"]
    restarted = {int(pid) for pid in re.findall(r"RayTrainWorker pid=(\d+)", text)} - {faults["killed_worker"]}
    assert restarted, "no new Train worker after the kill"
    assert re.search(r"resumed from \S+ after epoch 1", text), text[-3000:]
    run = trial_runs(faults["uri"])["killed_worker"]
    assert run.info.status == "FINISHED" and run.data.tags["runner.trial_status"] == "TERMINATED"
    client = MlflowClient(faults["uri"])
    for key in ("train_loss", "val_exact_match"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2]


def test_a_trial_that_fails_by_its_settings_fails_alone_without_a_retry(faults):
    run, reason = trial_runs(faults["uri"])["diverged"], r"loss became (nan|inf)"
    assert run.info.status == "FAILED" and run.data.tags["runner.trial_status"] == "FAILED"
    assert re.search(reason, run.data.tags["runner.error"]), run.data.tags["runner.error"]
    assert "train_loss" not in run.data.metrics  # it never finished an epoch
    # Failed by the trial function on its worker's report, not by Ray Train after spending its retry.
    assert "TrialFailed" in run.data.tags["runner.error"], run.data.tags["runner.error"]


def test_killed_sweep_driver_resumes_without_rerunning_or_touching_a_finished_trial(faults):
    runs = trial_runs(faults["uri"])
    assert runs["good"].info.status == "FINISHED"  # the trial that had not started ran after the resume
    for run_id, end_time in faults["finished_before_kill"].items():
        # Neither the resume nor the promotion reopened or re-closed a trial that had finished.
        assert MlflowClient(faults["uri"]).get_run(run_id).info.end_time == end_time


def test_a_full_disk_stops_the_sweep_with_its_state_whole_and_resume_finishes_it(faults):
    stopped = faults["disk_full"]
    if stopped is None:
        pytest.skip(f"no tmpfs could be mounted here ({faults['disk_why']}): the disk-full fault needs root")
    assert stopped["returncode"] == 1, stopped["output"][-3000:]  # stopped by its guard, not ended, not crashed
    errors = [line for line in stopped["output"].splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stopped["output"][-3000:]
    assert f"no space left on device in {faults['storage']}" in errors[0] and "--resume" in errors[0], errors
    at = stopped["output"].find("Traceback")
    assert at < 0, stopped["output"][max(0, at - 500):at + 2500]
    # Resumed without -v (the first driver had it): quiet, as a sweep started quietly; no Tune tables.
    assert "Trial status:" not in stopped["output"] and "Configuration for experiment" not in stopped["output"]
    # Tune's experiment state, as the full disk left it: whole (and the resume then read it).
    assert stopped["states"] and all(json.loads(text) for text in stopped["states"].values())
    runs = trial_runs(faults["uri"])
    client = MlflowClient(faults["uri"])
    assert sorted(m.step for m in client.get_metric_history(runs["good"].info.run_id, "train_loss")) == [1, 2]
    for role in ("killed_worker", "good"):  # every finished trial's last checkpoint reads back whole
        train_run = faults["storage"] / f"faults-{runs[role].data.tags['runner.trial_id']}"
        folders = sorted(path for path in train_run.glob("checkpoint_*") if path.is_dir())
        assert checkpoint.load(folders[-1]).epoch == 2, folders


def test_two_promotions_at_once_register_once_and_never_a_failed_trial(faults):
    """After a promotion killed mid-scoring (it leaves nothing that blocks or doubles the next), two at once."""
    assert "image features:" in faults["killed_promotion"] and "promotion:" not in faults["killed_promotion"]
    messages = sorted(next(line for line in out.splitlines() if line.startswith("promotion:"))
                      for out in faults["promoted"])
    assert messages[0].startswith("promotion: champion -> v1"), messages
    assert messages[1] == "promotion: version 1 is already the champion", messages
    client = MlflowClient(faults["uri"])
    runs = trial_runs(faults["uri"])
    finished = {runs[role].info.run_id for role in ("killed_worker", "good")}
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 1 and versions[0].run_id in finished
    experiment = client.get_experiment_by_name("quickstart")
    stages = client.search_runs([experiment.experiment_id], "tags.`runner.kind` = 'stage'")
    assert sorted(run.data.tags["runner.stage"] for run in stages) == ["one-shot", "zero-shot"]  # not twice
