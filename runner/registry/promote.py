"""Promotion: the best trial's adapter, scored on the held-out test split, registered in MLflow; the
`champion` alias moves to it only if it beats the current champion on the same test set.

Guarded and idempotent: a trial run is registered at most once (found again by its run id), the alias
never moves to a worse or unscored model, and a file lock serialises promotions to the same model. There
is no champion only when the registered model's own alias list has none; a registry error while reading
it stops promotion with the alias untouched (safe to re-run), never reads as "no champion". Lineage tags on the version: sweep run, trial params, data
fingerprints, base model, code version.
"""

from __future__ import annotations

import fcntl
import json
import logging
import math
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from runner.errors import ServiceError, UserError
from runner.eval.evaluate import write_predictions
from runner.eval.held_out import TestScorer
from runner.tracking.artifacts import CHECKPOINT_ARTIFACT
from runner.tracking.client import (
    PARENT_TAG,
    STATUS_TAG,
    Tracker,
    code_version,
    first_line,
    mlflow_globals,
)
from runner.train import checkpoint

log = logging.getLogger(__name__)

ALIAS = "champion"


@dataclass
class Promotion:
    version: str
    run_id: str
    moved: bool
    message: str


@dataclass(frozen=True)
class Decision:
    move: bool
    message: str


def decide(version: str, ours: dict[str, str], champion_version: str | None, theirs: dict[str, str] | None,
           metric: str, mode: str) -> Decision:
    """Whether `champion` moves to `version` (tags `ours`) from `champion_version` (tags `theirs`).

    Moves when there is no champion, or when ours is strictly better on the same test questions
    (equal `test_fingerprint`); a tie, a worse score, another test set or an unscored model keep it."""
    score = float(ours.get(metric, "nan"))
    if math.isnan(score):
        return Decision(False, f"v{version} has no {metric}; {ALIAS} left in place")
    if champion_version is None:
        return Decision(True, f"{ALIAS} -> v{version} ({metric}={score:.4f})")
    if champion_version == version:
        return Decision(False, f"version {version} is already the {ALIAS}")
    if theirs.get("test_fingerprint") != ours.get("test_fingerprint"):
        return Decision(False, f"{ALIAS} v{champion_version} was scored on a different test set "
                               f"({theirs.get('task')}); not comparable, {ALIAS} left in place")
    best = float(theirs.get(metric, "nan"))
    better = score > best if mode == "max" else score < best  # never against an unscored champion (nan)
    if not better:
        return Decision(False, f"v{version} {metric}={score:.4f} does not beat {ALIAS} v{champion_version} "
                               f"({best:.4f}); {ALIAS} left in place")
    return Decision(True, f"{ALIAS} -> v{version} ({metric}={score:.4f}, was v{champion_version} at {best:.4f})")


def best_trial_run(tracker: Tracker, sweep_run_id: str, metric: str, mode: str):
    """The finished trial run with the best validation value of `metric` (failed trials never count)."""
    runs = tracker.client.search_runs(
        [tracker.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{sweep_run_id}'", max_results=10_000)
    scored = [run for run in runs if run.info.status == "FINISHED" and run.data.tags.get(STATUS_TAG) != "FAILED"
              and not math.isnan(run.data.metrics.get(f"best_{metric}", math.nan))]
    if not scored:
        raise UserError(f"sweep run {sweep_run_id}: no finished trial reported {metric}; nothing to promote")
    sign = 1 if mode == "max" else -1
    return max(scored, key=lambda run: sign * run.data.metrics[f"best_{metric}"])


@contextmanager
def promotion_lock(path: Path) -> Iterator[None]:
    """Promotions to one registered model, one at a time (an flock: processes of one machine)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def promote(tracker: Tracker, *, best, sweep_run_id: str, metric: str, mode: str, model_name: str,
            scorer: TestScorer) -> Promotion:
    """Register the sweep's best trial run `best` (once) and move `champion` to it if it is better on
    test (`scorer` scores its checkpoint). Call it holding `promotion_lock`, or two promotions may both
    register and both move the alias."""
    from mlflow.exceptions import MlflowException

    test_metric = "test_" + metric.removeprefix("val_")
    client = tracker.client
    existing = client.search_model_versions(f"name = '{model_name}' and run_id = '{best.info.run_id}'")
    if existing:
        version = existing[0]
    else:
        result = scorer.score(with_adapter=True)
        log_test_scores(tracker, best.info.run_id, result)
        version = register(tracker, best, checkpoint.load(scorer.folder), model_name, result.scores,
                           result.fingerprint, sweep_run_id, scorer.placement)
    try:  # the registered model exists (just registered): its aliases say whether there is a champion
        aliases = client.get_registered_model(model_name).aliases
        champion = client.get_model_version(model_name, aliases[ALIAS]) if ALIAS in aliases else None
    except MlflowException as error:
        raise ServiceError(f"registry: cannot read the {ALIAS} of {model_name!r} at {tracker.tracking_uri} "
                           f"({first_line(error)}); {ALIAS} left untouched — run `runner promote` again "
                           "once MLflow answers") from None
    decision = decide(str(version.version), version.tags, None if champion is None else str(champion.version),
                      None if champion is None else champion.tags, test_metric, mode)
    if decision.move:
        client.set_registered_model_alias(model_name, ALIAS, version.version)
    return Promotion(str(version.version), best.info.run_id, decision.move, decision.message)


def log_test_scores(tracker: Tracker, run_id: str, result) -> None:
    from mlflow.entities import Metric

    tracker.client.log_batch(run_id, metrics=[Metric(f"test_{k}", float(v), 0, 0) for k, v in result.scores.items()])
    with tempfile.TemporaryDirectory() as scratch:
        predictions = Path(scratch) / "test_predictions.jsonl"
        write_predictions(result.rows, predictions)
        tracker.client.log_artifact(run_id, str(predictions))


def register(tracker: Tracker, run, saved: checkpoint.Checkpoint, model_name: str, scores: dict[str, float],
             test_fingerprint: str, sweep_run_id: str, test_placement: str):
    """Log the checkpoint as a pyfunc model in the trial's run and register a version of it."""
    import mlflow
    from mlflow.models import Model

    from runner.registry.pyfunc import SIGNATURE, pip_requirements

    trial = saved.config
    with mlflow_globals(tracker.tracking_uri):  # Model.log and register_model read only those
        # `Model.log(run_id=...)`, not `mlflow.start_run(run_id=...)` + `pyfunc.log_model`: reopening the
        # finished trial run would end it again with a new end time, rewriting a run promotion only reads.
        info = Model.log(
            artifact_path=None, name="model", flavor=mlflow.pyfunc, run_id=run.info.run_id,
            # Model from code: loading it runs our source file, never unpickles an object.
            python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={CHECKPOINT_ARTIFACT: str(saved.path)}, pip_requirements=pip_requirements(),
            # Stated, not inferred: MLflow cannot infer one from a model from code and says so on every promotion.
            signature=SIGNATURE)
        tags = {
            "sweep_run_id": sweep_run_id, "trial_run_id": run.info.run_id, "task": trial.task,
            "base_model": trial.model, "base_model_revision": str(trial.model_revision), "precision": trial.precision,
            "code_version": code_version(), "trial_params": json.dumps(run.data.params, sort_keys=True),
            "train_fingerprint": saved.data["train_fingerprint"], "test_fingerprint": test_fingerprint,
            "test_placement": test_placement,  # where it was scored: on a cluster, a GPU worker
            **{f"test_{k}": str(v) for k, v in scores.items()},
        }
        version = mlflow.register_model(info.model_uri, model_name, tags=tags)
    return tracker.client.get_model_version(model_name, version.version)
