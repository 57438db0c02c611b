"""One line of JSON per trial of a sweep, from its MLflow runs: where it ran (runner.placement), training
samples/s, peak GPU memory, seconds from its start to its first step, best validation metric, run start/end. For bench/gpu_scaling.sh.

    python bench/sweep_summary.py TRACKING_URI SWEEP_NAME
"""

import json
import sys

from runner.tracking.client import find_sweep


def main(uri: str, sweep: str) -> None:
    tracker, run = find_sweep(uri, sweep)
    trials = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{run.info.run_id}' "
                                        "and tags.`runner.kind` = 'trial'")
    for run in trials:
        metrics, tags = run.data.metrics, run.data.tags
        print(json.dumps({
            "trial": tags.get("runner.trial_id"), "status": tags.get("runner.trial_status"),
            "placement": tags.get("runner.placement"), "lora_rank": run.data.params.get("lora_rank"),
            "learning_rate": run.data.params.get("learning_rate"),
            "train_samples_per_second": metrics.get("train_samples_per_second"),
            "gpu_peak_gib_train": metrics.get("gpu_peak_gib_train"),
            "start_seconds": metrics.get("start_seconds"),  # trial start -> first step (its last run)
            "epochs": metrics.get("epoch"),
            "val_exact_match": metrics.get("val_exact_match"),
            "start_s": run.info.start_time / 1000, "end_s": (run.info.end_time or 0) / 1000}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
