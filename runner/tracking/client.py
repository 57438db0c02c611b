"""The MLflow client side: every tag name, the local default store, the sweep's parent run, finding a sweep.

Everything that writes to MLflow runs on the sweep driver (or the CLI); workers never import this.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from runner.config import check_tracking_uri
from runner.errors import UserError

log = logging.getLogger(__name__)

SWEEP_TAG = "runner.sweep"
PARENT_TAG = "runner.sweep_run_id"
TRIAL_TAG = "runner.trial_id"
STATUS_TAG = "runner.trial_status"
PLACEMENT_TAG = "runner.placement"  # host, Ray node, GPU: a trial's worker (last epoch's), a stage's scorer
KIND_TAG = "runner.kind"  # sweep, trial or stage
STAGE_TAG = "runner.stage"  # zero-shot, one-shot
TRIAL_RUN_TAG = "runner.trial_run_id"  # on a stage run: the trial whose base model it scored
CODE_TAG = "runner.code_version"
ERROR_TAG = "runner.error"
BEST_EPOCH_TAG = "runner.best_epoch"
FAILED_TRIALS_TAG = "runner.failed_trials"
# Reported keys that are not metrics of the model (Tune bookkeeping, paths).
NOT_METRICS = {"checkpoint_path", "epoch", "trial_id", "date", "hostname", "node_ip", "pid", "timestamp",
               "done", "should_checkpoint", "config", "experiment_tag", "training_iteration",
               "time_this_iter_s", "time_total_s", "time_since_restore", "iterations_since_restore"}


def default_tracking_uri() -> str:
    """Local mode: SQLite inside ./mlruns with artifacts beside it (the plain file store is deprecated)."""
    store = Path("mlruns").resolve()
    store.mkdir(exist_ok=True)
    return f"sqlite:///{store / 'mlflow.db'}"


@contextlib.contextmanager
def mlflow_globals(tracking_uri: str) -> Iterator[None]:
    """MLflow's process-wide tracking and registry URIs pointed at `tracking_uri`, for the MLflow APIs that read
    only those (`Model.log`, `models:/` downloads), and put back after: MLflow also copies them into the
    environment for subprocesses, so a leftover would send every later run or sweep started from the same
    process (a notebook, the test suite) to this store."""
    import mlflow

    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    before = {key: os.environ.get(key) for key in keys}
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before["MLFLOW_TRACKING_URI"])  # None: unset again
        mlflow.set_registry_uri(before["MLFLOW_REGISTRY_URI"])
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def artifact_root(tracking_uri: str) -> str | None:
    """Artifacts next to a local SQLite store; a server decides its own."""
    if tracking_uri.startswith("sqlite:///"):
        return (Path(tracking_uri[len("sqlite:///"):]).parent / "artifacts").as_uri()
    return None


def code_version(package_dir: Path | None = None) -> str:
    """The project's commit (+ "-dirty") when the package sits at the root of its own git checkout, else
    the installed package's version: a copy inside another repository must not record that one's commit."""
    from importlib.metadata import PackageNotFoundError, version

    package_dir = package_dir or Path(__file__).resolve().parents[1]
    root = package_dir.parent
    if (root / ".git").exists():
        try:
            sha = git(root, "rev-parse", "--short", "HEAD")
            dirty = git(root, "status", "--porcelain", "--untracked-files=no")
            return sha + ("-dirty" if dirty else "")
        except (OSError, subprocess.CalledProcessError):
            pass
    try:
        return version("blip2-lora-runner")
    except PackageNotFoundError:
        from runner import __version__

        return __version__


def source_tags() -> dict[str, str]:
    """MLflow's own source tags (the runs table's Source column) and ours: the code version that ran."""
    version = code_version()
    return {"mlflow.source.name": f"runner {version}", "mlflow.source.type": "LOCAL", CODE_TAG: version}


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, check=True, cwd=root).stdout.strip()


class Tracker:
    """A thin, failure-tolerant wrapper over MlflowClient for one experiment."""

    def __init__(self, tracking_uri: str, experiment: str):
        from mlflow import MlflowClient

        check_tracking_uri(tracking_uri, "tracking_uri")
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
        from mlflow.entities import Param

        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            SWEEP_TAG: name, KIND_TAG: "sweep", "runner.command": command, **source_tags(), **tags})
        self.client.log_dict(run.info.run_id, space, "search_space.json")
        params = [Param(key, value) for key, value in flatten(space).items()]
        for start in range(0, len(params), 100):  # one request per 100 (MLflow's batch limit), not one per key
            self.client.log_batch(run.info.run_id, params=params[start:start + 100])
        return run.info.run_id


def find_sweep(tracking_uri: str, sweep: str):
    """A sweep's MLflow run (tracker, run): `sweep` is its run id, or its name (the newest of that name)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if "'" in sweep:
        raise UserError(f"sweep: {sweep!r} is not a sweep name or run id")
    check_tracking_uri(tracking_uri, "--tracking-uri")
    client = MlflowClient(tracking_uri)
    try:
        experiments = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(experiments, f"tags.`{SWEEP_TAG}` = '{sweep}' and tags.`{KIND_TAG}` = 'sweep'",
                                  order_by=["attributes.start_time DESC"], max_results=1) if experiments else []
        if not runs and re.fullmatch(r"[0-9a-f]{32}", sweep):
            runs = [client.get_run(sweep)]
    except MlflowException as error:
        raise UserError(f"sweep: cannot read {sweep!r} from MLflow at {tracking_uri}: {first_line(error)}") from None
    if not runs or runs[0].data.tags.get(KIND_TAG) != "sweep":
        raise UserError(f"sweep: no sweep named (or with run id) {sweep!r} in MLflow at {tracking_uri}")
    experiment = client.get_experiment(runs[0].info.experiment_id).name
    return Tracker(tracking_uri, experiment), runs[0]


def newest_sweep(tracking_uri: str):
    """The most recently started sweep run in a store, or None."""
    from mlflow import MlflowClient

    check_tracking_uri(tracking_uri, "--tracking-uri")
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, f"tags.`{KIND_TAG}` = 'sweep'", order_by=["attributes.start_time DESC"],
                              max_results=1) if experiments else []
    return runs[0] if runs else None


def ui_links(base: str, experiment_id: str, sweep_run_id: str | None, metric: str | None = None) -> dict[str, str]:
    """MLflow UI links that open the trials. MLflow 3's UI takes the workflow from the URL (or the browser's
    last choice), not from the experiment, so a bare experiment link lands on the GenAI overview; and it
    nests child runs, collapsed, unless the runs table is filtered or sorted: filtered on the sweep and
    sorted by its metric, the table lists the sweep's trials (and stage runs) best first."""
    from urllib.parse import quote

    runs = f"{base}/#/experiments/{experiment_id}/runs"
    if not sweep_run_id:
        return {"runs": f"{runs}?workflowType=machine_learning"}
    in_sweep = f"tags.`{PARENT_TAG}` = '{sweep_run_id}'"
    query = f"workflowType=machine_learning&searchFilter={quote(in_sweep)}"
    if metric:
        query += f"&orderByKey={quote(f'metrics.`best_{metric}`')}&orderByAsc=false"
    return {"trials": f"{runs}?{query}", "sweep run": f"{runs}/{sweep_run_id}"}


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


