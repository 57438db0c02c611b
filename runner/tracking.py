"""MLflow tracking: the sweep's parent run and one child run per trial, written from the sweep driver.

Why our own Tune callback and not `ray.air.integrations.mlflow.MLflowLoggerCallback`: that one creates
a new run every time a trial starts, so a resumed sweep duplicates runs, and it cannot nest trials under
the sweep or log the best epoch's adapter from Ray Train checkpoints. Here every run is found again by
its tags (`runner.sweep_run_id`, `runner.trial_id`) and every metric step is logged at most once.

All writes go through the driver, so workers need no MLflow access; an MLflow outage costs warnings,
not training (the failed writes are kept in a local journal and replayed by `Tracker.replay`).
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray import tune

from runner.errors import UserError

log = logging.getLogger(__name__)

SWEEP_TAG = "runner.sweep"
PARENT_TAG = "runner.sweep_run_id"
TRIAL_TAG = "runner.trial_id"
STATUS_TAG = "runner.trial_status"
KIND_TAG = "runner.kind"
# Reported keys that are not metrics of the model (Tune bookkeeping, paths).
NOT_METRICS = {"checkpoint_path", "epoch", "trial_id", "date", "hostname", "node_ip", "pid", "timestamp",
               "done", "should_checkpoint", "config", "experiment_tag", "training_iteration",
               "time_this_iter_s", "time_total_s", "time_since_restore", "iterations_since_restore"}


def default_tracking_uri() -> str:
    """Local mode: SQLite inside ./mlruns with artifacts beside it (the plain file store is deprecated)."""
    store = Path("mlruns").resolve()
    store.mkdir(exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


def artifact_root(tracking_uri: str) -> str | None:
    """Artifacts next to a local SQLite store; a server decides its own."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


def code_version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        from runner import __version__

        return __version__


class Tracker:
    """A thin, failure-tolerant wrapper over MlflowClient for one experiment."""

    def __init__(self, tracking_uri: str, experiment: str):
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri)
        try:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = found.experiment_id if found else self.client.create_experiment(
                experiment, artifact_location=artifact_root(tracking_uri))
        except Exception as error:  # any MLflow/transport error here means the URI is unusable
            raise UserError(f"tracking_uri: cannot use MLflow at {tracking_uri}: {first_line(error)}") from error

    def find_run(self, **tags: str) -> str | None:
        query = " and ".join(f"tags.`{key}` = '{value}'" for key, value in tags.items())
        runs = self.client.search_runs([self.experiment_id], filter_string=query, max_results=1)
        return runs[0].info.run_id if runs else None

    def start_sweep(self, name: str, space: dict[str, Any], command: str, tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            SWEEP_TAG: name, KIND_TAG: "sweep", "runner.command": command, "runner.code_version": code_version(),
            **tags})
        self.client.log_dict(run.info.run_id, space, "search_space.json")
        for key, value in flatten(space).items():
            self.client.log_param(run.info.run_id, key, value)
        return run.info.run_id


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → MLflow params (`space.lora_rank.grid` = "[4, 8]"), values cut to MLflow's limit."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:6000]
    return flat


def first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


class TrialRuns(tune.Callback):
    """Tune callback: one MLflow child run per trial, metrics per epoch once, best adapter, final status."""

    def __init__(self, tracking_uri: str, experiment: str, sweep_run_id: str, metric: str, mode: str,
                 base: dict[str, Any], storage: str):
        self.tracking_uri, self.experiment, self.storage = tracking_uri, experiment, storage
        self.base = base
        self.sweep_run_id, self.metric, self.mode = sweep_run_id, metric, mode
        self._tracker: Tracker | None = None
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._logged: dict[str, set[int]] = {}  # run id -> epochs already in MLflow
        self._best: dict[str, tuple[float, dict]] = {}  # trial id -> (metric value, result)

    # Tune pickles callbacks into its experiment state: drop the live client.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tracker": None}

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri, self.experiment)
        return self._tracker

    def run_for(self, trial) -> str:
        """The trial's child run: found by tag (a resumed sweep) or created once."""
        from mlflow.entities import Param

        if trial.trial_id not in self._runs:
            client = self.tracker.client
            run_id = self.tracker.find_run(**{PARENT_TAG: self.sweep_run_id, TRIAL_TAG: trial.trial_id})
            if run_id is None:
                run_id = client.create_run(self.tracker.experiment_id, run_name=f"trial-{trial.trial_id}", tags={
                    "mlflow.parentRunId": self.sweep_run_id, PARENT_TAG: self.sweep_run_id,
                    TRIAL_TAG: trial.trial_id, KIND_TAG: "trial", STATUS_TAG: "RUNNING"}).info.run_id
                # Every setting of the trial (base + sampled), so MLflow's compare view shows them all.
                client.log_batch(run_id, params=[Param(key, str(value)[:6000]) for key, value in
                                                 {**self.base, **trial.config}.items()])
            self._runs[trial.trial_id] = run_id
            self._logged[run_id] = {int(m.step) for m in client.get_metric_history(run_id, "train_loss")}
        return self._runs[trial.trial_id]

    def on_trial_start(self, iteration, trials, trial, **info):
        self.run_for(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        run_id = self.run_for(trial)
        epoch = int(result["epoch"])
        value = result.get(self.metric)
        if value is not None and not math.isnan(value):
            best = self._best.get(trial.trial_id)
            better = best is None or (value > best[0] if self.mode == "max" else value < best[0])
            if better:
                self._best[trial.trial_id] = (value, dict(result))
        if epoch in self._logged[run_id]:
            return  # already logged before a resume or a worker restart
        from mlflow.entities import Metric

        timestamp = int(result.get("timestamp", 0) * 1000)
        batch = [Metric(key, float(v), timestamp, epoch) for key, v in result.items()
                 if key not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)]
        self.tracker.client.log_batch(run_id, metrics=batch)
        self._logged[run_id].add(epoch)

    def on_trial_complete(self, iteration, trials, trial, **info):
        run_id = self.run_for(trial)
        client = self.tracker.client
        best = self._best.get(trial.trial_id)
        if best is not None:
            value, result = best
            client.log_metric(run_id, f"best_{self.metric}", value, step=int(result["epoch"]))
            client.set_tag(run_id, "runner.best_epoch", str(int(result["epoch"])))
            with local_copy(result["checkpoint_path"], self.storage) as checkpoint:
                client.log_artifacts(run_id, str(checkpoint), "checkpoint")
        last_epoch = max(self._logged.get(run_id, {0}) or {0})
        status = "TERMINATED" if last_epoch >= {**self.base, **trial.config}["epochs"] else "STOPPED_EARLY"
        client.set_tag(run_id, STATUS_TAG, status)
        client.set_terminated(run_id, "FINISHED")

    def on_trial_error(self, iteration, trials, trial, **info):
        run_id = self.run_for(trial)
        client = self.tracker.client
        reason = trial_error(trial)
        client.set_tag(run_id, STATUS_TAG, "FAILED")
        client.set_tag(run_id, "runner.error", reason[:5000])
        client.set_terminated(run_id, "FAILED")


@contextmanager
def local_copy(path: str, storage: str) -> Iterator[Path]:
    """A checkpoint directory in Ray's storage, on local disk (copied only when storage is remote)."""
    if "://" not in storage:
        yield Path(path)
        return
    import pyarrow.fs

    filesystem, _ = pyarrow.fs.FileSystem.from_uri(storage)
    with tempfile.TemporaryDirectory(prefix="runner-ckpt-") as target:
        pyarrow.fs.copy_files(path, target, source_filesystem=filesystem)
        yield Path(target)


def trial_error(trial) -> str:
    """The last line of the trial's error (the exception message), for the MLflow run and the table."""
    path = trial.error_file
    if path and Path(path).exists():
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()
    return "failed (no error file)"


def download_checkpoint(tracking_uri: str, run_id: str) -> Path:
    """The best epoch's checkpoint (adapter + trial config) of a trial run, downloaded to a temp dir."""
    from mlflow.artifacts import download_artifacts

    target = Path(tempfile.mkdtemp(prefix="runner-ckpt-"))
    return Path(download_artifacts(run_id=run_id, artifact_path="checkpoint", dst_path=str(target),
                                   tracking_uri=tracking_uri))


def sweep_state_file(storage_path: str, name: str) -> Path:
    return Path(storage_path) / name / "runner_sweep.json"


def save_sweep_state(storage_path: str, name: str, state: dict) -> None:
    path = sweep_state_file(storage_path, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))
