"""The sweep driver SIGKILLed at three moments, each several times, then resumed: what survives.

The suite kills the driver once per moment (tests/test_faults.py, tests/test_search.py); this repeats them.
Each repetition is a fresh sweep of two quick-start trials (one at a time, 2 epochs, 200 samples) in its own
folder and SQLite store. Moments:
  mid-trial    the first trial has logged an epoch and not finished: `runner tune --resume`
  after-trial  the first trial has just finished in MLflow: `runner tune --resume`
  promotion    the sweep done (--no-promote), `runner promote` killed while it scores the test questions:
               `runner promote` again
Killed means the CLI and everything it started (its process group, the local Ray cluster with it). The
checks are the faults tests': two trial runs, no run created twice, each epoch once, a run finished before
the kill untouched (its end time), one registered version and the champion on it.

    python bench/driver_kills.py --repeat 2      # ~20 min on the 2-core dev machine
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import (  # noqa: E402
    MODEL,
    SPACE,
    epochs_logged,
    finished_runs,
    kill_when,
    kill_while_scoring,
    run_cli,
)

MOMENTS = ("mid-trial", "after-trial", "promotion")


def sweep_args(root: Path, uri: str) -> list[str]:
    return [SPACE, "name=kills", f"storage_path={root / 'ray'}", f"tracking_uri={uri}", "num_samples=1",
            "trial.epochs=2", "trial.max_eval_examples=50", "max_concurrent_trials=1", "test_max_examples=100",
            "scheduler.type=none", "space={learning_rate: {grid: [3.0e-3, 5.0e-3]}, n_samples: {choice: [200]}}"]


def one(moment: str, root: Path) -> dict:
    from mlflow import MlflowClient

    uri = f"sqlite:///{root / 'mlflow.db'}"
    args = sweep_args(root, uri)
    if moment == "promotion":
        done = run_cli("tune", *args, "--no-promote", cwd=root)
        assert done.returncode == 0, done.stdout[-2000:]
        before = finished_runs(uri)
        started = time.time()
        kill_while_scoring(args, root)
        killed_at = time.time() - started
        again = run_cli("promote", *args, cwd=root)
    else:
        ready = ((lambda: epochs_logged(uri) >= 1 and not finished_runs(uri)) if moment == "mid-trial"
                 else (lambda: len(finished_runs(uri)) >= 1))
        started = time.time()
        kill_when(["tune", *args], root, ready, timeout=900)
        killed_at = time.time() - started
        before = finished_runs(uri)
        again = run_cli("tune", *args, "--resume", cwd=root)
    problems = [] if again.returncode == 0 else [f"the re-run exited {again.returncode}: {again.stderr[-300:]}"]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("quickstart")
    trials = client.search_runs([experiment.experiment_id], "tags.`runner.kind` = 'trial'")
    ids = [run.data.tags["runner.trial_id"] for run in trials]
    if len(trials) != 2 or len(set(ids)) != 2:
        problems.append(f"{len(trials)} trial runs for {len(set(ids))} trials")
    for run in trials:
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "train_loss"))
        if steps != [1, 2] or run.info.status != "FINISHED":
            problems.append(f"trial {run.data.tags['runner.trial_id']}: {run.info.status}, epochs {steps}")
    touched = [run_id for run_id, end in before.items() if client.get_run(run_id).info.end_time != end]
    if touched:
        problems.append(f"{len(touched)} run(s) finished before the kill were closed again")
    versions = client.search_model_versions(f"name = '{MODEL}'")
    champion = client.get_model_version_by_alias(MODEL, "champion").version if versions else None
    if len(versions) != 1 or champion != versions[0].version:
        problems.append(f"{len(versions)} registered versions, champion {champion}")
    return {"killed after s": round(killed_at), "finished before the kill": len(before), "problems": problems}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--moments", default=",".join(MOMENTS))
    options = parser.parse_args()
    os.environ.setdefault("RUNNER_CACHE", tempfile.mkdtemp(prefix="kills-cache-"))  # one feature cache for all
    rows = []
    print(f"{'moment':12s} {'run':>3s} {'killed after':>12s} {'finished before':>15s} {'wall s':>6s}  outcome",
          flush=True)
    for moment in options.moments.split(","):
        for repetition in range(1, options.repeat + 1):
            started = time.time()
            with tempfile.TemporaryDirectory(prefix=f"kills-{moment}-") as scratch:
                row = one(moment, Path(scratch))
            rows.append((moment, row))
            outcome = "; ".join(row["problems"]) or "nothing lost or doubled"
            print(f"{moment:12s} {repetition:3d} {row['killed after s']:10d} s {row['finished before the kill']:15d} "
                  f"{time.time() - started:6.0f}  {outcome}", flush=True)
    failed = [moment for moment, row in rows if row["problems"]]
    print(f"\n{len(rows) - len(failed)} of {len(rows)} kills survived" + (f"; failed: {failed}" if failed else ""))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
