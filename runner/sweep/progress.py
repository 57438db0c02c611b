"""The live view of a sweep on the console: a Tune callback that prints one row per epoch per trial
(the sampled settings, the sweep metric, the shuffled-image control, loss, samples/s, status) and, when a
trial's worker has started, a status line with what Ray's resources are held by — the trials' Train
workers hold the GPUs, not the trial functions Tune counts. Tune's own output is off (verbosity 0) unless
`-v`; this view prints in both cases.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ray import tune

from runner.sweep.trial import PLACEMENT_KEY


def number(value: Any) -> str:
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return "–" if value is None else str(value)


class SweepProgress(tune.Callback):
    """One aligned row per epoch per trial, a final row per trial, a status line per trial start."""

    def __init__(self, keys: list[str], metric: str, epochs: int, say: Callable[[str], None] = print):
        self.keys, self.metric, self.epochs, self.say = keys, metric, epochs, say
        self.columns = ["trial", *keys, "epoch", metric, "shuffled EM", "loss", "samples/s", "status"]
        self.widths = [max(len(c), 7) for c in self.columns]
        self.widths[0] = 11  # Tune's trial ids: 5 hex + _ + 5 digits
        self._header_said = False
        self._epochs: dict[str, int] = {}

    def row(self, trial, result: dict, status: str, settled: bool = False) -> None:
        """A trial's epoch row; `settled`: only its final status (the numbers are in the row above)."""
        epoch = int(result.get("epoch", 0) or 0)
        values = [number(result.get(key)) for key in
                  (self.metric, "val_shuffled_exact_match", "train_loss", "train_samples_per_second")]
        cells = [trial.trial_id, *(number(trial.config.get(k)) for k in self.keys),
                 f"{epoch}/{self.epochs}" if epoch else "–", *([""] * 4 if settled else values), status]
        if not self._header_said:
            self.say("  ".join(c.ljust(w) for c, w in zip(self.columns, self.widths)).rstrip())
            self._header_said = True
        self.say("  ".join(str(c).ljust(w) for c, w in zip(cells, self.widths)).rstrip())

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "epoch" not in result:
            return  # a resumed trial whose Train run had already finished
        first = trial.trial_id not in self._epochs
        self._epochs[trial.trial_id] = int(result["epoch"])
        self.row(trial, result, "RUNNING")
        if first:
            self.say(f"  {status_line(trials)}; trial {trial.trial_id}'s worker: {result.get(PLACEMENT_KEY, '?')}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        done = self._epochs.get(trial.trial_id, 0) >= self.epochs
        self.row(trial, trial.last_result or {}, "TERMINATED" if done else "STOPPED_EARLY", settled=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        from runner.tracking.callback import trial_error

        self.row(trial, trial.last_result or {}, "FAILED", settled=True)
        self.say(f"  trial {trial.trial_id} failed: {trial_error(trial)[:300]} (full error: {trial.error_file})")


def status_line(trials) -> str:
    """Trial counts and the resources held in the cluster right now (Ray's own accounting)."""
    import ray

    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.status] = counts.get(trial.status, 0) + 1
    states = ", ".join(f"{n} {status.lower()}" for status, n in sorted(counts.items()))
    total, free = ray.cluster_resources(), ray.available_resources()
    held = ", ".join(f"{total[key] - free.get(key, 0.0):g}/{total[key]:g} {key}"
                     for key in ("CPU", "GPU") if key in total) or "none"
    if "GPU" not in total:
        held += ", 0 GPU"
    return f"trials: {states}; held now: {held}"
