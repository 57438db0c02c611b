"""MLflow tracking: the sweep's parent run and one child run per trial, written from the sweep driver.

Why our own Tune callback and not `ray.air.integrations.mlflow.MLflowLoggerCallback`: that one creates
a new run every time a trial starts, so a resumed sweep duplicates runs, and it cannot nest trials under
the sweep or log the best epoch's adapter from Ray Train checkpoints. Here every run is found again by
its tags (`runner.sweep_run_id`, `runner.trial_id`) and every metric step is logged at most once.

All writes go through the driver, so workers need no MLflow access; an MLflow outage costs warnings,
not training: failed writes wait in a local journal, retried at the next event or by `runner sync`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ray import tune

from runner.config import check_tracking_uri
from runner.errors import UserError

log = logging.getLogger(__name__)

SWEEP_TAG = "runner.sweep"
PARENT_TAG = "runner.sweep_run_id"
TRIAL_TAG = "runner.trial_id"
STATUS_TAG = "runner.trial_status"
PLACEMENT_TAG = "runner.placement"  # host, Ray node and GPU of the trial's worker (last epoch's)
PLACEMENT_KEY = "placement"  # the worker's report key for it (runner/sweep.py)
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
        run = self.client.create_run(self.experiment_id, run_name=name, tags={
            SWEEP_TAG: name, KIND_TAG: "sweep", "runner.command": command,
            "runner.code_version": code_version(), **tags})
        self.client.log_dict(run.info.run_id, space, "search_space.json")
        for key, value in flatten(space).items():
            self.client.log_param(run.info.run_id, key, value)
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


def _mlflow_down_errors() -> tuple[type[BaseException], ...]:
    """What an unreachable or failing tracking server raises through MlflowClient (and Tracker)."""
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.exceptions.RequestException, OSError, UserError)


MLFLOW_DOWN = _mlflow_down_errors()


class TrialRuns(tune.Callback):
    """Tune callback: one MLflow child run per trial, metrics per epoch once, best adapter, final status.

    Every Tune event becomes a small JSON-able update, applied in order. When MLflow cannot be reached,
    updates queue up (in memory and in `journal`) and training goes on; the queue is replayed at the
    next event once MLflow answers again, and `runner sync` replays a journal left after the sweep.
    """

    def __init__(self, tracking_uri: str, experiment: str, sweep_run_id: str, metric: str, mode: str,
                 base: dict[str, Any], storage: str, journal: Path):
        self.tracking_uri, self.experiment, self.storage, self.journal = tracking_uri, experiment, storage, journal
        self.base = base
        self.sweep_run_id, self.metric, self.mode = sweep_run_id, metric, mode
        self._tracker: Tracker | None = None
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._logged: dict[str, set[int]] = {}  # run id -> epochs already in MLflow
        self._best: dict[str, tuple[float, dict]] = {}  # trial id -> (metric value, result)
        self._last_epoch: dict[str, int] = {}
        self._pending: list[dict] = []
        self._outage = False

    # Tune pickles callbacks into its experiment state: drop the live client.
    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tracker": None}

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri, self.experiment)
        return self._tracker

    # Tune events -> updates
    def on_trial_start(self, iteration, trials, trial, **info):
        self.submit({"kind": "start", "trial": trial.trial_id, "config": dict(trial.config)})

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" not in result:
            return  # a resumed trial whose Train run had already finished: nothing new to log
        epoch = int(result["epoch"])
        self._last_epoch[trial.trial_id] = max(epoch, self._last_epoch.get(trial.trial_id, 0))
        value = result.get(self.metric)
        if value is not None and not math.isnan(value):
            best = self._best.get(trial.trial_id)
            if best is None or (value > best[0] if self.mode == "max" else value < best[0]):
                self._best[trial.trial_id] = (value, {"epoch": epoch, "checkpoint_path": result["checkpoint_path"]})
        metrics = {key: float(v) for key, v in result.items()
                   if key not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)}
        self.submit({"kind": "result", "trial": trial.trial_id, "config": dict(trial.config), "epoch": epoch,
                     "timestamp": int(result.get("timestamp", 0) * 1000), "metrics": metrics,
                     "placement": result.get(PLACEMENT_KEY)})

    def on_trial_complete(self, iteration, trials, trial, **info):
        config = {**self.base, **trial.config}
        best = self._best.get(trial.trial_id)
        status = "TERMINATED" if self._last_epoch.get(trial.trial_id, 0) >= config["epochs"] else "STOPPED_EARLY"
        self.submit({"kind": "complete", "trial": trial.trial_id, "config": dict(trial.config), "status": status,
                     "best": None if best is None else {"value": best[0], **best[1]}})

    def on_trial_error(self, iteration, trials, trial, **info):
        self.submit({"kind": "error", "trial": trial.trial_id, "config": dict(trial.config),
                     "reason": trial_error(trial)})

    def on_experiment_end(self, trials, **info):
        self.flush()
        if self._pending:
            log.error("%d MLflow updates could not be written (MLflow unreachable); they are kept in %s — "
                      "run `runner sync SPACE.yaml` once MLflow is back", len(self._pending), self.journal)

    # Applying updates
    def submit(self, update: dict) -> None:
        self._pending.append(update)
        self.flush()

    def flush(self) -> None:
        """Apply queued updates in order; on an MLflow outage keep the rest (journal) and carry on."""
        while self._pending:
            try:
                self.apply(self._pending[0])
            except MLFLOW_DOWN as error:
                if not self._outage:
                    log.warning("MLflow unreachable (%s); updates are kept in %s and retried at the next "
                                "event — training goes on", first_line(error), self.journal)
                self._outage, self._tracker = True, None
                break
            self._pending.pop(0)
        if self._outage and not self._pending:
            log.warning("MLflow reachable again: every queued update is written")
            self._outage = False
        self.write_journal()

    def replay_journal(self) -> int:
        """Write what an earlier outage left in the journal; return how many updates are still pending."""
        if self.journal.exists():
            self._pending = [json.loads(line) for line in self.journal.read_text().splitlines() if line]
            self._outage = True
            self.flush()
        return len(self._pending)

    def write_journal(self) -> None:
        if self._pending:
            self.journal.parent.mkdir(parents=True, exist_ok=True)
            self.journal.write_text("".join(json.dumps(update) + "\n" for update in self._pending))
        elif self.journal.exists():
            self.journal.unlink()

    def run_for(self, trial_id: str, config: dict[str, Any]) -> str:
        """The trial's child run: found by tag (a resumed sweep) or created once."""
        from mlflow.entities import Param

        if trial_id not in self._runs:
            client = self.tracker.client
            run_id = self.tracker.find_run(**{PARENT_TAG: self.sweep_run_id, TRIAL_TAG: trial_id})
            if run_id is None:
                run_id = client.create_run(self.tracker.experiment_id, run_name=f"trial-{trial_id}", tags={
                    "mlflow.parentRunId": self.sweep_run_id, PARENT_TAG: self.sweep_run_id,
                    TRIAL_TAG: trial_id, KIND_TAG: "trial", STATUS_TAG: "RUNNING"}).info.run_id
                # Every setting of the trial (base + sampled), so MLflow's compare view shows them all.
                client.log_batch(run_id, params=[Param(key, str(value)[:6000])
                                                 for key, value in {**self.base, **config}.items()])
            self._logged[run_id] = {int(m.step) for m in client.get_metric_history(run_id, "train_loss")}
            self._runs[trial_id] = run_id
        return self._runs[trial_id]

    def apply(self, update: dict) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self.run_for(update["trial"], update["config"])
        client = self.tracker.client
        if update["kind"] == "result":
            if update["epoch"] in self._logged[run_id]:
                return  # already logged before a resume or a worker restart
            placement = update.get("placement")  # absent from journals written before it was recorded
            client.log_batch(run_id, metrics=[Metric(key, value, update["timestamp"], update["epoch"])
                                              for key, value in update["metrics"].items()],
                             tags=[RunTag(PLACEMENT_TAG, placement)] if placement else [])
            self._logged[run_id].add(update["epoch"])
        elif client.get_run(run_id).info.status in ("FINISHED", "FAILED", "KILLED"):
            return  # a resumed sweep re-reports a trial whose run was already closed: keep what it recorded
        elif update["kind"] == "complete":
            best = update["best"]
            if best is not None:
                client.log_metric(run_id, f"best_{self.metric}", best["value"], step=best["epoch"])
                client.set_tag(run_id, "runner.best_epoch", str(best["epoch"]))
                with local_copy(best["checkpoint_path"], self.storage) as checkpoint:
                    client.log_artifacts(run_id, str(checkpoint), "checkpoint")
            client.set_tag(run_id, STATUS_TAG, update["status"])
            client.set_terminated(run_id, "FINISHED")
        elif update["kind"] == "error":
            client.set_tag(run_id, STATUS_TAG, "FAILED")
            client.set_tag(run_id, "runner.error", update["reason"][:5000])
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


def fetch_adapter(source: str, tracking_uri: str | None) -> Path:
    """An adapter to score, as a local directory: a path as given, `runs:/<trial run id>` (its best
    checkpoint) or `models:/<name>@<alias>` / `models:/<name>/<version>` (a registered version, with
    its trial settings written beside the adapter as an epoch checkpoint would have them)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from runner.train import ADAPTER_DIR, CONFIG_FILE

    if not source.startswith(("runs:/", "models:/")):
        if not Path(source).exists():
            raise UserError(f"--adapter: {source} does not exist")
        return Path(source)
    tracking_uri = tracking_uri or default_tracking_uri()
    check_tracking_uri(tracking_uri, "--tracking-uri")
    try:
        if source.startswith("runs:/"):
            return download_checkpoint(tracking_uri, source.removeprefix("runs:/").strip("/").split("/")[0])
        import mlflow

        mlflow.set_registry_uri(tracking_uri)  # models:/ resolves through the registry URI, not tracking_uri=
        model = Path(download_artifacts(artifact_uri=source, dst_path=tempfile.mkdtemp(prefix="runner-model-"),
                                        tracking_uri=tracking_uri))
    except MlflowException as error:
        raise UserError(f"--adapter: cannot fetch {source} from MLflow at {tracking_uri}: "
                        f"{first_line(error)}") from None
    settings = next(model.rglob("settings.json"), None)
    adapter = next(model.rglob("adapter_config.json"), None)
    if settings is None or adapter is None:
        raise UserError(f"--adapter: {source} is not a model registered by runner (no settings.json/adapter)")
    checkpoint = model / "checkpoint"
    checkpoint.mkdir()
    adapter.parent.rename(checkpoint / ADAPTER_DIR)
    (checkpoint / CONFIG_FILE).write_text(json.dumps(json.loads(settings.read_text())["trial"], indent=2))
    return checkpoint


def sweep_state_file(state_dir: Path) -> Path:
    return state_dir / "runner_sweep.json"


def save_sweep_state(state_dir: Path, state: dict) -> None:
    path = sweep_state_file(state_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(state, indent=2))
