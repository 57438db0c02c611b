"""The stage comparison of a sweep: zero-shot → one-shot → fine-tuned, on the same test questions.

The zero-shot and one-shot stages score the best trial's base model (same task, model, precision,
decoding) without its adapter; each is an MLflow run nested under the sweep (`runner.kind=stage`),
with `test_<metric>` metrics and its per-question predictions. The fine-tuned stage is the best
trial's own run, whose `test_<metric>` promotion logged (the same questions: same split, seed and
`test_max_examples`), so the adapter is not scored twice. Safe to re-run: existing stages are kept.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

from runner.eval.evaluate import write_predictions
from runner.eval.held_out import TestScorer
from runner.tracking.client import (
    KIND_TAG,
    PARENT_TAG,
    PLACEMENT_TAG,
    STAGE_TAG,
    TRIAL_RUN_TAG,
    Tracker,
    source_tags,
)

log = logging.getLogger(__name__)

BASE_STAGES = {"zero-shot": False, "one-shot": True}  # stage -> one-shot prompt


def compare_stages(tracker: Tracker, *, sweep_run_id: str, trial_run_id: str, scorer: TestScorer) -> list[str]:
    """Create the missing base-model stage runs under the sweep (`scorer` holds the trial's checkpoint:
    the same base model and test questions as promotion's); return the stages created."""
    from mlflow.entities import Metric

    client = tracker.client
    created = []
    for stage, one_shot in BASE_STAGES.items():
        if tracker.find_run(**{PARENT_TAG: sweep_run_id, STAGE_TAG: stage}):
            continue
        log.info("scoring the %s stage on the test split", stage)
        result = scorer.score(with_adapter=False, one_shot=one_shot)
        run_id = client.create_run(tracker.experiment_id, run_name=f"stage-{stage}", tags={
            "mlflow.parentRunId": sweep_run_id, PARENT_TAG: sweep_run_id, KIND_TAG: "stage", STAGE_TAG: stage,
            TRIAL_RUN_TAG: trial_run_id, "test_fingerprint": result.fingerprint, PLACEMENT_TAG: scorer.placement,
            **source_tags()}).info.run_id
        client.log_param(run_id, "stage", stage)
        client.log_batch(run_id, metrics=[Metric(f"test_{k}", float(v), 0, 0) for k, v in result.scores.items()])
        with tempfile.TemporaryDirectory() as scratch:
            predictions = Path(scratch) / f"{stage}_predictions.jsonl"
            write_predictions(result.rows, predictions)
            client.log_artifact(run_id, str(predictions))
        client.set_terminated(run_id, "FINISHED")
        created.append(stage)
    return created
