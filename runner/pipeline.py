"""What each command does, from config to result: the sweep, then the post-sweep pipeline (connect to
Ray, promote, stage comparison, report) that `runner tune` and `runner promote` share.

Every function takes a `say` callable for the lines a person reads (the CLI passes click.echo).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.config import SweepConfig
from runner.errors import ServiceError, UserError
from runner.sweep import state

Say = Callable[[str], None]


def tune(config: SweepConfig, *, address: str | None, resume: bool, command: str, promote: bool, say: Say) -> None:
    """The main job: the sweep, then (unless told not to) promotion, stages and the report."""
    from runner.report import trials_table
    from runner.sweep.tuner import run_sweep

    outcome = run_sweep(config, address=address, resume=resume, command=command)
    say(trials_table(outcome.results, config))
    if promote:
        after_sweep(config, address=address, say=say)
    say(mlflow_hint(config.tracking_uri or default_store(), outcome.sweep_run_id))


def after_sweep(config: SweepConfig, *, address: str | None, say: Say) -> None:
    """Promotion, the stage runs and the report, holding the model's lock (concurrent calls run one after
    the other). Test scoring asks Ray for the trials' own resources, so on a cluster it runs on a GPU
    worker; on CPU it runs in this process (no Ray needed)."""
    from runner.eval.held_out import TestScorer
    from runner.registry.promote import best_trial_run, promote, promotion_lock
    from runner.registry.stages import compare_stages
    from runner.tracking.artifacts import download_checkpoint
    from runner.tracking.client import Tracker

    saved = state.read(config)
    left = wait_for_tracking(config, saved, say)  # promotion reads what the sweep recorded
    if left:
        raise ServiceError(f"tracking_uri: MLflow at {saved['tracking_uri']} is unreachable and {left} updates of "
                           f"this sweep are kept in {state.journal_file(config)}; once it answers, run `runner sync` "
                           "and then `runner promote` with the same space file")
    tracker = Tracker(saved["tracking_uri"], saved["experiment"])
    resources = {"cpu": config.resources.cpu, "gpu": config.resources.gpu}
    if config.resources.gpu > 0:
        from runner.sweep.tuner import connect

        connect(address)
    best = best_trial_run(tracker, saved["sweep_run_id"], config.metric, config.mode)
    fetch = lambda: download_checkpoint(tracker.tracking_uri, best.info.run_id)  # noqa: E731
    with promotion_lock(config.state_dir.parent / f"promote-{config.registered_model}.lock"), \
            TestScorer(fetch, config.test_max_examples, resources) as scorer:
        outcome = promote(tracker, best=best, sweep_run_id=saved["sweep_run_id"], mode=config.mode,
                          model_name=config.registered_model, metric=config.metric, scorer=scorer)
        say(f"promotion: {outcome.message}")
        say(f"registered model: models:/{config.registered_model}/{outcome.version} "
            f"(champion: models:/{config.registered_model}@champion)")
        compare_stages(tracker, sweep_run_id=saved["sweep_run_id"], trial_run_id=best.info.run_id, scorer=scorer)
    write_report(tracker, saved["sweep_run_id"], Path("runs") / "reports" / config.name, say)


TRACKING_WAIT_S = 120  # how long the post-sweep phase waits for an MLflow that went away mid-sweep


def wait_for_tracking(config: SweepConfig, saved: dict, say: Say) -> int:
    """Write what an outage left queued, waiting (bounded) for MLflow to answer; the updates still queued."""
    import time

    callback = trial_runs(config, saved)
    deadline = time.monotonic() + TRACKING_WAIT_S
    left = callback.replay_journal()
    if left:
        say(f"waiting up to {TRACKING_WAIT_S} s for MLflow at {saved['tracking_uri']} ({left} updates queued)")
    while left and time.monotonic() < deadline:
        time.sleep(5)
        left = callback.replay_journal()
    return left


def sync(config: SweepConfig, say: Say) -> None:
    """Write what a tracking outage left queued; say what MLflow refused for good."""
    from runner.tracking.callback import report_failed

    saved = state.read(config)
    left = trial_runs(config, saved).replay_journal()
    refused = report_failed(state.failed_file(config))
    if left:
        raise UserError(f"tracking_uri: MLflow at {saved['tracking_uri']} still unreachable; {left} updates kept")
    say("MLflow is up to date" + (f" except {refused} updates it refused (see {state.failed_file(config)})"
                                  if refused else ""))


def trial_runs(config: SweepConfig, saved: dict):
    """The sweep's MLflow callback, rebuilt from its saved state (to replay what an outage left queued)."""
    from runner.tracking.callback import TrialRuns

    return TrialRuns(saved["tracking_uri"], saved["experiment"], saved["sweep_run_id"], config.metric, config.mode,
                     config.trial.to_dict(), config.storage, state.journal_file(config), state.failed_file(config))


def report(sweep: str, tracking_uri: str | None, out: Path | None, say: Say) -> None:
    """The report of a sweep found in MLflow by name or run id."""
    from runner.tracking.client import SWEEP_TAG, find_sweep

    tracker, run = find_sweep(tracking_uri or default_store(), sweep)
    name = run.data.tags.get(SWEEP_TAG, sweep)
    write_report(tracker, run.info.run_id, out or Path("runs") / "reports" / name, say)


def write_report(tracker, sweep_run_id: str, out: Path, say: Say) -> None:
    from runner.report import write_report as write

    path = write(tracker, sweep_run_id, out)
    say(f"report: {path} (and in MLflow: sweep run {sweep_run_id}, artifacts/report)")


def evaluate(adapter: str | None, tracking_uri: str | None, options: dict[str, Any], split: str, one_shot: bool):
    """Score an adapter (a checkpoint, `runs:/`, `models:/`) or the bare model on a split."""
    from runner.eval.evaluate import score_adapter
    from runner.tracking.artifacts import fetch_adapter
    from runner.train import checkpoint

    local = fetch_adapter(adapter, tracking_uri) if adapter else None
    return score_adapter(checkpoint.read_config(local, options), local, split, one_shot=one_shot)


def mlflow_hint(tracking_uri: str, sweep_run_id: str) -> str:
    """Where to look at the sweep: a server's own UI, or the line that serves a local store on loopback."""
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow: open {tracking_uri} (sweep run {sweep_run_id})"
    return f"MLflow: mlflow ui --backend-store-uri {tracking_uri} --host 127.0.0.1  (sweep run {sweep_run_id})"


def default_store() -> str:
    from runner.tracking.client import default_tracking_uri

    return default_tracking_uri()
