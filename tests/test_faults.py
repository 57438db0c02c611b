"""Faults injected for real into a real sweep (local Ray cluster, SQLite MLflow, tiny model)."""

import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from mlflow import MlflowClient

from tests.conftest import SPACE, free_port, mlflow_server, run_cli

SMALL = ["trial.epochs=1", "trial.max_eval_examples=100", "test_max_examples=200", "scheduler.type=none"]


def trial_runs(uri: str, sweep: str):
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quickstart")
    assert experiment is not None
    parent = client.search_runs([experiment.experiment_id], f"tags.`runner.sweep` = '{sweep}'")
    assert len(parent) == 1
    return client, client.search_runs(
        [experiment.experiment_id],
        f"tags.`runner.sweep_run_id` = '{parent[0].info.run_id}' and tags.`runner.kind` = 'trial'")


# A GPU running out of memory cannot happen here (no GPU): this sitecustomize, put on the path of every
# Ray worker, makes the optimizer of the trial with the marked learning rate raise torch's own OOM error.
INJECT_OOM = """
import os, sys
if os.environ.get("RUNNER_TEST_OOM_LR") and any("default_worker.py" in arg for arg in sys.argv):
    import torch
    marked, step = float(os.environ["RUNNER_TEST_OOM_LR"]), torch.optim.AdamW.step
    def failing_step(self, *args, **kwargs):
        if self.param_groups[0].get("initial_lr") == marked:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
        return step(self, *args, **kwargs)
    torch.optim.AdamW.step = failing_step
"""


def test_diverging_and_out_of_memory_trials_fail_alone_and_concurrent_promotes_register_once(tiny_model, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    (tmp_path / "inject").mkdir()
    (tmp_path / "inject" / "sitecustomize.py").write_text(INJECT_OOM)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(tmp_path / "inject"), os.environ.get("PYTHONPATH")])),
           "RUNNER_TEST_OOM_LR": "0.002"}
    args = [SPACE, "name=nan", f"storage_path={tmp_path / 'ray'}", f"tracking_uri={uri}", *SMALL]
    result = run_cli("tune", *args, "num_samples=1", "max_failures=0", "--no-promote",
                     "space={learning_rate: {grid: [3.0e-3, 1.0e+6, 2.0e-3]}, n_samples: {choice: [300]}}",
                     cwd=tmp_path, timeout=900, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    client, runs = trial_runs(uri, "nan")
    by_lr = {float(run.data.params["learning_rate"]): run for run in runs}
    diverged, out_of_memory, good = by_lr[1e6], by_lr[2e-3], by_lr[3e-3]
    for failed in (diverged, out_of_memory):
        assert failed.info.status == "FAILED" and failed.data.tags["runner.trial_status"] == "FAILED"
    assert re.search(r"loss became (nan|inf)", diverged.data.tags["runner.error"])
    assert "out of GPU memory" in out_of_memory.data.tags["runner.error"]
    assert "lower batch_size" in out_of_memory.data.tags["runner.error"]
    assert good.info.status == "FINISHED"

    # Two promotions of this sweep at once: one registers and moves the alias, the other finds it done.
    promotes = [subprocess.Popen([sys.executable, "-m", "runner.cli", "promote", *args], cwd=tmp_path,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [process.communicate(timeout=900) for process in promotes]
    assert [process.returncode for process in promotes] == [0, 0], [err[-2000:] for _, err in outputs]
    messages = sorted(next(line for line in out.splitlines() if line.startswith("promotion:")) for out, _ in outputs)
    assert messages[0].startswith("promotion: champion -> v1"), messages
    assert messages[1] == "promotion: version 1 is already the champion", messages
    versions = client.search_model_versions("name = 'tiny-blip2-easy-vqa'")
    assert [v.run_id for v in versions] == [good.info.run_id]  # never a failed trial, registered once
    experiment = client.get_experiment_by_name("quickstart")
    stages = client.search_runs([experiment.experiment_id], "tags.`runner.kind` = 'stage'")
    assert sorted(run.data.tags["runner.stage"] for run in stages) == ["one-shot", "zero-shot"]  # not twice


def test_killed_train_worker_restarts_its_trial_from_the_last_checkpoint(tiny_model, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    driver = subprocess.Popen(
        [sys.executable, "-m", "runner.cli", "tune", SPACE, "name=worker", f"storage_path={tmp_path / 'ray'}",
         f"tracking_uri={uri}", "num_samples=1", "max_failures=1", "trial.epochs=3", "trial.max_eval_examples=100",
         "scheduler.type=none", "--no-promote",
         "space={learning_rate: {choice: [3.0e-3]}, n_samples: {choice: [2000]}}"],
        cwd=tmp_path, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = Collected(driver.stderr)
    try:
        killed = None
        deadline = time.time() + 600
        while killed is None and time.time() < deadline and driver.poll() is None:
            time.sleep(0.5)
            if epochs_logged(uri):  # epoch 1 went all the way to MLflow; the worker is in epoch 2
                killed = int(re.findall(r"RayTrainWorker pid=(\d+)", log.text())[-1])
                os.kill(killed, signal.SIGKILL)
        assert killed is not None, log.text()[-3000:]
        assert driver.wait(900) == 0, log.text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    text = log.text()
    restarted = {int(pid) for pid in re.findall(r"RayTrainWorker pid=(\d+)", text)} - {killed}
    assert restarted, "no new Train worker after the kill"
    assert re.search(r"resumed from \S+ after epoch 1", text), text[-3000:]
    client, runs = trial_runs(uri, "worker")
    (run,) = runs
    assert run.info.status == "FINISHED" and run.data.tags["runner.trial_status"] == "TERMINATED"
    for key in ("train_loss", "val_exact_match"):
        assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3]


def count(uri: str, query: str) -> int:
    """Poll the SQLite store read-only (an MlflowClient here could race the sweep creating the tables)."""
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
            return connection.execute(query).fetchone()[0]
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return 0


def epochs_logged(uri: str) -> int:
    return count(uri, "select count(*) from metrics where key = 'train_loss'")


def trials_finished(uri: str) -> int:
    return count(uri, "select count(*) from runs join tags on runs.run_uuid = tags.run_uuid where "
                      "tags.key = 'runner.kind' and tags.value = 'trial' and runs.status = 'FINISHED'")


class Collected:
    """A child's stderr, read by a thread as it comes (so the child never blocks on a full pipe)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        threading.Thread(target=self.read, args=(stream,), daemon=True).start()

    def read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)


def test_killed_sweep_driver_resumes_without_rerunning_or_duplicating(tiny_model, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["tune", SPACE, "name=killed", f"storage_path={tmp_path / 'ray'}", f"tracking_uri={uri}",
            "num_samples=4", "max_concurrent_trials=1", *SMALL,
            "space={learning_rate: {choice: [3.0e-3]}, n_samples: {choice: [200, 300, 400, 500]}}"]
    driver = subprocess.Popen([sys.executable, "-m", "runner.cli", *args], cwd=tmp_path, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ})
    deadline = time.time() + 600
    while time.time() < deadline and not trials_finished(uri):
        time.sleep(1)
    _, runs = trial_runs(uri, "killed")
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



def test_mlflow_server_outage_loses_nothing_and_no_secret_is_recorded(tiny_model, tmp_path):
    """The tracking server is stopped mid-sweep and started again: training goes on, the queued updates
    arrive. Dummy secrets sit in the environment; none reaches MLflow or a log."""
    port = free_port()
    backend, artifacts = f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts"
    # Tokens come from the environment (a URI with credentials is refused: tests/test_bad_input.py).
    secrets = {"HF_TOKEN": f"hf_{uuid.uuid4().hex}", "HUGGING_FACE_HUB_TOKEN": f"hf_{uuid.uuid4().hex}",
               "MLFLOW_TRACKING_TOKEN": uuid.uuid4().hex, "MLFLOW_TRACKING_PASSWORD": uuid.uuid4().hex,
               "RAY_AUTH_TOKEN": uuid.uuid4().hex}
    command = [sys.executable, "-m", "runner.cli", "tune", SPACE, "name=outage", f"storage_path={tmp_path / 'ray'}",
               f"tracking_uri=http://127.0.0.1:{port}", "num_samples=1", "max_concurrent_trials=1",
               *SMALL, "space={learning_rate: {choice: [3.0e-3]}, n_samples: {grid: [600, 700, 800]}}"]
    server = mlflow_server(backend, artifacts, port)
    server.__enter__()
    driver = subprocess.Popen(command, cwd=tmp_path, start_new_session=True, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, env={**os.environ, **secrets})
    log = Collected(driver.stdout)
    try:
        deadline = time.time() + 600
        while not epochs_logged(backend) and time.time() < deadline:
            time.sleep(0.5)
        server.__exit__(None, None, None)  # MLflow goes away after the first trial's first epoch
        while "MLflow unreachable" not in log.text() and driver.poll() is None:
            time.sleep(0.5)
        time.sleep(10)  # a while without MLflow: the sweep keeps training
        assert driver.poll() is None, "the sweep ended during the outage; make its trials longer"
        server = mlflow_server(backend, artifacts, port)
        server.__enter__()
        assert driver.wait(900) == 0, log.text()[-3000:]
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        server.__exit__(None, None, None)
    text = log.text()
    assert "MLflow reachable again: every queued update is written" in text
    assert not (tmp_path / "ray" / "outage" / "mlflow_pending.jsonl").exists()
    client, runs = trial_runs(backend, "outage")
    assert len(runs) == 3 and all(run.info.status == "FINISHED" for run in runs)
    for run in runs:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "train_loss")] == [1]
        assert "best_val_exact_match" in run.data.metrics
    assert len(client.search_model_versions("name = 'tiny-blip2-easy-vqa'")) == 1

    # No secret anywhere: the MLflow database and artifacts, the sweep's own output, Ray's logs.
    places = [tmp_path / "mlflow.db", *artifacts.rglob("*"), *Path("/tmp/ray/session_latest/logs").rglob("*")]
    recorded = b"".join(p.read_bytes() for p in places if p.is_file()) + text.encode()
    for name, secret in secrets.items():
        assert secret.encode() not in recorded, name
