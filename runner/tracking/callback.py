"""The Tune callback that records a sweep in MLflow: one child run per trial, written from the sweep driver.

Why our own callback and not `ray.air.integrations.mlflow.MLflowLoggerCallback`: that one creates a new
run every time a trial starts, so a resumed sweep duplicates runs, and it cannot nest trials under the
sweep or log the best epoch's adapter from Ray Train checkpoints. Here every run is found again by its
tags (`runner.sweep_run_id`, `runner.trial_id`) and every metric step is logged at most once.

An MLflow outage costs warnings, not training: an update that fails for a *transient* reason (the server
unreachable, a 5xx, a timeout) waits in the journal, in order, and is retried at the next event or by
`runner sync`; one that fails for a *permanent* reason (a value MLflow rejects, a missing local file)
is recorded with its reason in the failed file, skipped, and reported at the end of the sweep and by
`runner sync`, so it never blocks the updates behind it. Nothing is dropped silently.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from pathlib import Path
from typing import Any

from ray import tune

from runner.errors import UserError
from runner.sweep.trial import PLACEMENT_KEY
from runner.tracking.artifacts import CHECKPOINT_ARTIFACT, local_copy
from runner.tracking.client import (
    BEST_EPOCH_TAG,
    ERROR_TAG,
    FAILED_TRIALS_TAG,
    KIND_TAG,
    NOT_METRICS,
    PARENT_TAG,
    PLACEMENT_TAG,
    STATUS_TAG,
    TRIAL_TAG,
    Tracker,
    first_line,
    source_tags,
)
from runner.tracking.datasets import dataset_inputs

log = logging.getLogger(__name__)

# MLflow error codes that say "try again later" (the REST client maps a 5xx, a refused connection and a
# timeout to these); every other MLflow error is about the update itself.
TRANSIENT_CODES = {"INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE", "DEADLINE_EXCEEDED", "REQUEST_LIMIT_EXCEEDED",
                   "CANCELLED", "ABORTED", "ENDPOINT_NOT_FOUND"}


def tracking_errors() -> tuple[type[BaseException], ...]:
    """What writing one update to MLflow can raise besides a bug (those propagate)."""
    import requests
    from mlflow.exceptions import MlflowException

    return (MlflowException, requests.exceptions.RequestException, OSError, UserError)


def is_transient(error: BaseException) -> bool:
    """A failure that a later retry can cure (MLflow down or overloaded), not one of the update itself."""
    import requests
    from mlflow.exceptions import MlflowException

    if isinstance(error, MlflowException):
        return error.error_code in TRANSIENT_CODES
    if isinstance(error, UserError):  # Tracker(): the server did not answer at all
        return True
    return isinstance(error, (requests.exceptions.RequestException, ConnectionError, TimeoutError))


class TrialRuns(tune.Callback):
    """Tune callback: one MLflow child run per trial, metrics per epoch once, best adapter, final status.

    Every Tune event becomes a small JSON-able update, journaled and applied in order by one writer thread:
    Tune's event loop never waits on MLflow, so a slow tracking server delays the records, not the sweep
    (measured: docs/PERFORMANCE.md, bench/slow_tracking.py). When MLflow cannot be reached, updates queue
    up (in memory and in `journal`) and training goes on; the queue is retried at the next event once
    MLflow answers again, and `runner sync` replays a journal left after the sweep.
    """

    def __init__(self, tracking_uri: str, experiment: str, sweep_run_id: str, metric: str, mode: str,
                 base: dict[str, Any], storage: str, journal: Path, failed: Path,
                 datasets: list[dict[str, str]] | None = None):
        self.tracking_uri, self.experiment, self.storage = tracking_uri, experiment, storage
        self.datasets = datasets or []  # the trials' data, described once (runner/tracking/datasets.py)
        self.journal, self.failed = journal, failed
        self.base = base
        self.sweep_run_id, self.metric, self.mode = sweep_run_id, metric, mode
        self._tracker: Tracker | None = None
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._logged: dict[str, set[int]] = {}  # run id -> epochs already in MLflow
        self._best: dict[str, tuple[float, dict]] = {}  # trial id -> (metric value, result)
        self._last_epoch: dict[str, int] = {}
        self._pending: list[dict] = []
        self._outage = False
        self._start_bookkeeping()

    def _start_bookkeeping(self) -> None:
        self._lock = threading.Lock()  # _pending, _runs, _logged and the journal: Tune's thread and the writer's
        self._wake = threading.Condition()
        self._writer: threading.Thread | None = None
        self._submitted = self._written = 0  # submits so far; submits the writer has made a pass over
        self._bug: BaseException | None = None  # what the writer raised besides a tracking error: re-raised here
        self._journal_failed = False  # the last journal write failed (warned once)

    # Tune pickles callbacks into its experiment state: drop the live client and the writer thread.
    def __getstate__(self) -> dict:
        with self._lock:
            state = {**self.__dict__, "_pending": list(self._pending), "_runs": dict(self._runs),
                     "_logged": {run: set(epochs) for run, epochs in self._logged.items()}}
        for live in ("_tracker", "_lock", "_wake", "_writer", "_bug"):
            state.pop(live)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _tracker=None)
        # The journal is newer than Tune's saved copy (written at every submit; gone once all is applied):
        # a sweep killed while updates were in flight resumes with them.
        self._pending = read_journal(self.journal)
        self._start_bookkeeping()

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
        self.drain()
        report_failed(self.failed)

    # Applying updates
    def submit(self, update: dict) -> None:
        """Queue `update` (journaled at once: a killed driver loses nothing) and wake the writer."""
        self._raise_bug()
        with self._lock:
            self._pending.append(update)
            self.write_journal()
        with self._wake:
            self._submitted += 1
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="mlflow-writer", daemon=True)
                self._writer.start()
            self._wake.notify_all()

    def drain(self) -> int:
        """Wait until the writer has tried every update submitted so far, then let it end; return how many
        still wait for MLflow."""
        with self._wake:
            while self._written < self._submitted:
                self._wake.wait()
            writer, self._writer = self._writer, None
            self._wake.notify_all()
        if writer is not None:
            writer.join()
        self._raise_bug()
        return len(self._pending)

    def _raise_bug(self) -> None:
        if self._bug is not None:
            raise RuntimeError("the MLflow writer thread failed") from self._bug

    def _write_loop(self) -> None:
        me = threading.current_thread()
        while True:
            with self._wake:
                while self._written == self._submitted and self._writer is me:
                    self._wake.wait()
                if self._writer is not me:  # drained: the next submit starts a new writer
                    return
                seen = self._submitted
            try:
                self.flush()
            except BaseException as error:  # a bug, not MLflow: Tune's thread raises it at its next event
                self._bug = error
            with self._wake:
                self._written = seen
                self._wake.notify_all()

    def flush(self) -> None:
        """Apply queued updates in order. A transient failure keeps it and the rest (journal) for the next
        event; a permanent one is recorded in the failed file and skipped."""
        errors = tracking_errors()
        while True:
            with self._lock:
                if not self._pending:
                    break
                update = self._pending[0]
            try:
                self.apply(update)
            except errors as error:
                if is_transient(error):
                    if not self._outage:
                        log.warning("MLflow unreachable (%s); updates are kept in %s and retried at the next "
                                    "event — training goes on", first_line(error), self.journal)
                    self._outage, self._tracker = True, None
                    break
                log.error("MLflow refused an update (%s of trial %s): %s — recorded in %s, skipped",
                          update["kind"], update["trial"], first_line(error), self.failed)
                record_failed(self.failed, update, error)
            with self._lock:
                self._pending.pop(0)
        with self._lock:
            if self._outage and not self._pending:
                log.warning("MLflow reachable again: every queued update is written")
                self._outage = False
            self.write_journal()

    def replay_journal(self) -> int:
        """Write what an earlier outage left in the journal; return how many updates are still pending."""
        if self.journal.exists():
            self._pending = read_journal(self.journal)
            self._outage = True
            self.flush()
        return len(self._pending)

    def write_journal(self) -> None:
        """Mirror the queue to the journal. A disk that cannot take it (full: runner/sweep/storage.py stops
        the sweep) keeps the previous journal whole and the queue in memory, written to MLflow as ever."""
        temporary = self.journal.with_suffix(".tmp")
        try:
            if self._pending:
                self.journal.parent.mkdir(parents=True, exist_ok=True)
                temporary.write_text("".join(json.dumps(update) + "\n" for update in self._pending))
                temporary.replace(self.journal)  # a crash mid-write keeps the previous journal whole
            elif self.journal.exists():
                self.journal.unlink()
        except OSError as error:
            temporary.unlink(missing_ok=True)
            if not self._journal_failed:
                log.warning("cannot write the MLflow journal %s (%s); its updates wait in memory", self.journal,
                            error)
            self._journal_failed = True
        else:
            self._journal_failed = False

    def run_for(self, trial_id: str, config: dict[str, Any]) -> str:
        """The trial's child run: found by tag (a resumed sweep) or created once."""
        from mlflow.entities import Param

        if trial_id not in self._runs:
            client = self.tracker.client
            run_id = self.tracker.find_run(**{PARENT_TAG: self.sweep_run_id, TRIAL_TAG: trial_id})
            if run_id is None:
                run_id = client.create_run(self.tracker.experiment_id, run_name=f"trial-{trial_id}", tags={
                    "mlflow.parentRunId": self.sweep_run_id, PARENT_TAG: self.sweep_run_id,
                    TRIAL_TAG: trial_id, KIND_TAG: "trial", STATUS_TAG: "RUNNING", **source_tags()}).info.run_id
                # Every setting of the trial (base + sampled), so MLflow's compare view shows them all.
                client.log_batch(run_id, params=[Param(key, str(value)[:6000])
                                                 for key, value in {**self.base, **config}.items()])
                if self.datasets:
                    client.log_inputs(run_id, datasets=dataset_inputs(self.datasets))
            logged = {int(m.step) for m in client.get_metric_history(run_id, "train_loss")}
            with self._lock:
                self._logged[run_id], self._runs[trial_id] = logged, run_id
        return self._runs[trial_id]

    def end_sweep(self, failed_trials: int) -> int:
        """The sweep run's last update (failed-trial count, FINISHED), queued like the trials' updates;
        returns how many updates are still waiting for MLflow."""
        self.submit({"kind": "sweep_end", "trial": "", "config": {}, "failed": failed_trials})
        if self.drain():
            log.error("%d MLflow updates could not be written (MLflow unreachable); they are kept in %s — "
                      "run `runner sync SPACE.yaml` once MLflow is back", len(self._pending), self.journal)
        return len(self._pending)

    def apply(self, update: dict) -> None:
        from mlflow.entities import Metric, RunTag

        client = self.tracker.client
        if update["kind"] == "sweep_end":
            client.set_tag(self.sweep_run_id, FAILED_TRIALS_TAG, str(update["failed"]))
            client.set_terminated(self.sweep_run_id, "FINISHED")
            return
        run_id = self.run_for(update["trial"], update["config"])
        if update["kind"] == "result":
            if update["epoch"] in self._logged[run_id]:
                return  # already logged before a resume or a worker restart
            placement = update.get("placement")  # absent from journals written before it was recorded
            client.log_batch(run_id, metrics=[Metric(key, value, update["timestamp"], update["epoch"])
                                              for key, value in update["metrics"].items()],
                             tags=[RunTag(PLACEMENT_TAG, placement)] if placement else [])
            with self._lock:
                self._logged[run_id].add(update["epoch"])
        elif client.get_run(run_id).info.status in ("FINISHED", "FAILED", "KILLED"):
            return  # a resumed sweep re-reports a trial whose run was already closed: keep what it recorded
        elif update["kind"] == "complete":
            best = update["best"]
            if best is not None:
                client.log_metric(run_id, f"best_{self.metric}", best["value"], step=best["epoch"])
                client.set_tag(run_id, BEST_EPOCH_TAG, str(best["epoch"]))
                with local_copy(best["checkpoint_path"], self.storage) as checkpoint:
                    if not (checkpoint / "checkpoint.json").is_file():  # never a run without its adapter
                        raise FileNotFoundError(f"no checkpoint at {best['checkpoint_path']}")
                    client.log_artifacts(run_id, str(checkpoint), CHECKPOINT_ARTIFACT)
                    log_adapter_model(client, self.tracker.experiment_id, run_id, checkpoint, best["epoch"])
            client.set_tag(run_id, STATUS_TAG, update["status"])
            client.set_terminated(run_id, "FINISHED")
        elif update["kind"] == "error":
            client.set_tag(run_id, STATUS_TAG, "FAILED")
            client.set_tag(run_id, ERROR_TAG, update["reason"][:5000])
            client.set_terminated(run_id, "FAILED")


ADAPTER_MODEL = "adapter"  # the name of each trial's logged model (MLflow's Models column)


def log_adapter_model(client, experiment_id: str, run_id: str, checkpoint: Path, epoch: int) -> None:
    """The best epoch's LoRA adapter as an MLflow logged model of the trial's run, once (a replayed update
    finds it). Only the adapter: the run's `checkpoint/` artifacts keep the rest, promotion registers
    its own pyfunc model (runner/registry/promote.py)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    from runner.train.checkpoint import adapter_dir

    existing = client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
    if any(model.name == ADAPTER_MODEL for model in existing):
        return
    model = client.create_logged_model(experiment_id, name=ADAPTER_MODEL, source_run_id=run_id,
                                       tags={BEST_EPOCH_TAG: str(epoch)}, model_type="peft-lora-adapter")
    client.log_model_artifacts(model.model_id, str(adapter_dir(checkpoint)))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=epoch)])


def trial_error(trial) -> str:
    """The last line of the trial's error (the exception message), for the MLflow run and the table."""
    path = trial.error_file
    if path and Path(path).exists():
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        if lines:
            return lines[-1].strip()
    return "failed (no error file)"


def read_journal(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def record_failed(path: Path, update: dict, error: BaseException) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        handle.write(json.dumps({"reason": first_line(error), "update": update}) + "\n")


def failed_updates(path: Path) -> list[dict]:
    """Updates MLflow refused for good, each with its reason (empty when none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def report_failed(path: Path) -> int:
    failed = failed_updates(path)
    if failed:
        log.error("%d MLflow updates were refused for good and skipped (first: %s of trial %s: %s); each is "
                  "in %s with its reason", len(failed), failed[0]["update"]["kind"], failed[0]["update"]["trial"],
                  failed[0]["reason"], path)
    return len(failed)
