"""Promotion: the best trial's adapter, scored on the held-out test split, registered in MLflow;
the `champion` alias moves to it only if it beats the current champion on the same test set.

Guarded and idempotent: a trial run is registered at most once (found again by its run id), the
alias never moves to a worse model, and a file lock serialises promotions to the same model.
Lineage tags on the version: sweep run, trial params, data fingerprints, base model, code version.
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

from runner.errors import UserError
from runner.held_out import evaluate_on_test, pack, unpack
from runner.tracking import PARENT_TAG, STATUS_TAG, Tracker, code_version, download_checkpoint

log = logging.getLogger(__name__)

ALIAS = "champion"


@dataclass
class Promotion:
    version: str
    run_id: str
    test_metric: float
    champion_before: str | None
    moved: bool
    message: str


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


def promote(tracker: Tracker, *, sweep_run_id: str, metric: str, mode: str, model_name: str,
            test_max_examples: int | None, resources: dict[str, float] | None = None) -> Promotion:
    """Register the sweep's best trial (once) and move `champion` to it if it is better on test.
    Call it holding `promotion_lock`, or two promotions may both register and both move the alias.

    With `resources` (and Ray connected) the test evaluation runs as a Ray task that asks for them,
    so on a cluster it lands on a GPU worker; files travel through Ray, MLflow stays on the head.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from runner.evaluate import checkpoint_config, write_predictions

    best = best_trial_run(tracker, sweep_run_id, metric, mode)
    test_metric_name = "test_" + metric.removeprefix("val_")
    client = tracker.client
    existing = client.search_model_versions(f"name = '{model_name}' and run_id = '{best.info.run_id}'")
    if existing:
        version = existing[0]
    else:
        checkpoint = download_checkpoint(tracker.tracking_uri, best.info.run_id)
        result, processor_files = evaluate_on_test(pack(checkpoint), test_max_examples, resources,
                                                   with_adapter=True, save_processor=True)
        processor_dir = unpack(processor_files, Path(tempfile.mkdtemp(prefix="runner-processor-")))
        trial = checkpoint_config(checkpoint, {"max_eval_examples": test_max_examples})
        client.log_batch(best.info.run_id, metrics=[
            mlflow.entities.Metric(f"test_{k}", float(v), 0, 0) for k, v in result.scores.items()])
        predictions = processor_dir.parent / "test_predictions.jsonl"
        write_predictions(result.rows, predictions)
        client.log_artifact(best.info.run_id, str(predictions))
        version = register(tracker, best, checkpoint, processor_dir, trial, model_name, result.scores,
                           result.fingerprint, sweep_run_id)
    tags = version.tags
    ours = float(tags[test_metric_name])
    try:
        champion = client.get_model_version_by_alias(model_name, ALIAS)
    except MlflowException:
        champion = None
    if champion is not None and str(champion.version) == str(version.version):
        return Promotion(version.version, best.info.run_id, ours, champion.version, False,
                         f"version {version.version} is already the {ALIAS}")
    if champion is not None:
        if champion.tags.get("test_fingerprint") != tags["test_fingerprint"]:
            return Promotion(version.version, best.info.run_id, ours, champion.version, False,
                             f"{ALIAS} v{champion.version} was scored on a different test set "
                             f"({champion.tags.get('task')}); not comparable, {ALIAS} left in place")
        theirs = float(champion.tags.get(test_metric_name, "nan"))
        better = ours > theirs if mode == "max" else ours < theirs
        if not better:
            return Promotion(version.version, best.info.run_id, ours, champion.version, False,
                             f"v{version.version} {test_metric_name}={ours:.4f} does not beat {ALIAS} "
                             f"v{champion.version} ({theirs:.4f}); {ALIAS} left in place")
    client.set_registered_model_alias(model_name, ALIAS, version.version)
    return Promotion(version.version, best.info.run_id, ours, champion.version if champion else None, True,
                     f"{ALIAS} -> v{version.version} ({test_metric_name}={ours:.4f})")


def register(tracker: Tracker, run, checkpoint: Path, processor_dir: Path, trial, model_name: str,
             scores: dict[str, float], test_fingerprint: str, sweep_run_id: str):
    """Log the adapter + processor as a pyfunc model in the trial's run and register a version of it."""
    import mlflow

    from runner.registry import pip_requirements
    from runner.train import ADAPTER_DIR, DATA_FILE

    mlflow.set_tracking_uri(tracker.tracking_uri)
    train_fingerprint = json.loads((checkpoint / DATA_FILE).read_text())["train_fingerprint"]
    settings = processor_dir.parent / "settings.json"  # not model_config: MLflow would log it as params
    settings.write_text(json.dumps({"base_model": trial.model, "base_model_revision": trial.model_revision,
                                    "precision": trial.precision, "trial": trial.to_dict()}))
    with mlflow.start_run(run_id=run.info.run_id):
        info = mlflow.pyfunc.log_model(
            # Model from code: loading it runs our source file, never unpickles an object.
            name="model", python_model=str(Path(__file__).with_name("pyfunc_model.py")),
            artifacts={"adapter": str(checkpoint / ADAPTER_DIR), "processor": str(processor_dir),
                       "settings": str(settings)},
            pip_requirements=pip_requirements())
    tags = {
        "sweep_run_id": sweep_run_id, "trial_run_id": run.info.run_id, "task": trial.task,
        "base_model": trial.model, "base_model_revision": str(trial.model_revision), "precision": trial.precision,
        "code_version": code_version(), "trial_params": json.dumps(run.data.params, sort_keys=True),
        "train_fingerprint": train_fingerprint, "test_fingerprint": test_fingerprint,
        **{f"test_{k}": str(v) for k, v in scores.items()},
    }
    version = mlflow.register_model(info.model_uri, model_name, tags=tags)
    return tracker.client.get_model_version(model_name, version.version)
