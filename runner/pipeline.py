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

    outcome = run_sweep(config, address=address, resume=resume, command=command, say=say, score_in_tail=promote)
    say(trials_table(outcome.results, config))
    if promote:
        after_sweep(config, address=address, say=say, warm=outcome.scorer)
    # The same space and overrides find the same store and sweep.
    say_links(state.read(config), config.metric,
              command.replace("runner tune", "runner ui", 1).removesuffix(" --resume"), say)


def after_sweep(config: SweepConfig, *, address: str | None, say: Say, warm=None) -> None:
    """Promotion, the stage runs and the report, holding the model's lock (concurrent calls run one after
    the other). Test scoring asks Ray for the trials' own resources, so on a cluster it runs on a GPU
    worker — `warm`'s, loaded during the sweep, when it scores like the champion; on CPU it runs in this
    process (no Ray needed)."""
    from runner import console
    from runner.eval.held_out import TestScorer
    from runner.registry.promote import best_trial_run, promote, promotion_lock
    from runner.registry.stages import compare_stages
    from runner.report import stage_table
    from runner.tracking.artifacts import download_checkpoint
    from runner.tracking.client import Tracker

    saved = state.read(config)
    console.log_to(state.log_file(config))
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
            TestScorer(fetch, config.test_max_examples, resources, warm) as scorer:
        outcome = promote(tracker, best=best, sweep_run_id=saved["sweep_run_id"], mode=config.mode,
                          model_name=config.registered_model, metric=config.metric, scorer=scorer)
        say(f"promotion: {outcome.message}")
        say(f"registered model: models:/{config.registered_model}/{outcome.version} "
            f"(champion: models:/{config.registered_model}@champion)")
        compare_stages(tracker, sweep_run_id=saved["sweep_run_id"], trial_run_id=best.info.run_id, scorer=scorer)
    say(stage_table(tracker, saved["sweep_run_id"]))
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
                     config.trial.to_dict(), config.storage, state.journal_file(config), state.failed_file(config),
                     saved.get("datasets"))


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


def say_links(saved: dict, metric: str, ui_command: str, say: Say) -> None:
    """Links that open the sweep in MLflow: on its server, or on the local store that `ui_command` serves."""
    from runner.tracking.client import Tracker, ui_links

    uri = saved["tracking_uri"]
    experiment_id = Tracker(uri, saved["experiment"]).experiment_id
    if uri.startswith(("http://", "https://")):
        base = uri.rstrip("/")
        say(f"MLflow at {base}:")
    else:
        base = f"http://127.0.0.1:{UI_PORT}"
        say(f"MLflow: run `{ui_command}` (mlflow ui on this store, {base}), then open")
    for what, link in ui_links(base, experiment_id, saved["sweep_run_id"], metric).items():
        say(f"  {what}: {link}")


UI_PORT = 5000  # mlflow ui's own default
# MLflow 3's server starts seven job-queue processes (huey consumers, for its GenAI jobs) unless told not to;
# the runs, the registry and the UI need none of them.
MLFLOW_SERVER_ENV = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def ui(tracking_uri: str | None, sweep: str | None, port: int, say: Say) -> int:
    """Serve a local store with `mlflow ui` on 127.0.0.1 and say the links that open the sweep's trials (the
    newest sweep unless named); a server's URI is only linked. Returns when mlflow ui stops (Ctrl-C)."""
    import os
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    from runner.tracking.client import find_sweep, newest_sweep, ui_links

    uri = tracking_uri or default_store()
    run = find_sweep(uri, sweep)[1] if sweep else newest_sweep(uri)
    if uri.startswith(("http://", "https://")):
        base, process = uri.rstrip("/"), None
    else:
        base = f"http://127.0.0.1:{port}"
        log_file = Path(tempfile.mkstemp(prefix="mlflow-ui-", suffix=".log")[1])
        # One worker process: a local UI serves one person, and each of MLflow's default four imports the
        # server at start (~5 CPU-seconds apiece; measured on this project's 2-core CI machine).
        with log_file.open("w") as output:
            process = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                                        "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                       stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, **MLFLOW_SERVER_ENV})
        deadline = time.monotonic() + 180  # /health took ~13 s on two busy cores
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    if process.poll() is None:
                        os.killpg(process.pid, signal.SIGTERM)
                    tail = " | ".join(log_file.read_text().strip().splitlines()[-3:])
                    raise ServiceError(f"--port {port}: mlflow ui did not start ({tail or 'no output'}; "
                                       f"its log: {log_file})")
                time.sleep(1)
        say(f"mlflow ui on {base} serving {uri} (its log: {log_file}; Ctrl-C stops it)")
    if run is None:
        say(f"  no sweep in this store yet: {base}/#/experiments")
    else:
        say(f"sweep {run.data.tags.get('runner.sweep', run.info.run_name)}:")
        for what, link in ui_links(base, run.info.experiment_id, run.info.run_id, run.data.params.get("metric")).items():
            say(f"  {what}: {link}")
    if process is None:
        return 0

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    # `kill` stops it as Ctrl-C does, and Ctrl-C works even where the shell started us ignoring SIGINT.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        return process.wait()
    except KeyboardInterrupt:
        os.killpg(process.pid, signal.SIGTERM)  # mlflow ui and its server workers
        process.wait(30)
        return 0


def default_store() -> str:
    from runner.tracking.client import default_tracking_uri

    return default_tracking_uri()
