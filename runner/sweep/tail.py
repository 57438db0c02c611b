"""The sweep's tail: once every trial has started and one has ended, the GPU share it frees would sit idle
until the last trial ends. The test scorer loads there instead (runner/eval/held_out.py `WarmScorer`: the
base model, the test images' features, the zero- and one-shot scores), so after the sweep only the
champion's adapter is added and scored. A trial that waits for resources (its worker restarting after its
node was lost) gets the share back at once.
"""

from __future__ import annotations

import time

import ray
from ray import tune

from runner.config import SCORING_FIELDS, SweepConfig
from runner.eval.held_out import WarmScorer

WAITING = ("PENDING", "RESCHEDULING")  # a placement group's states while it waits for resources
CHECK_EVERY_S = 2.0  # how often the driver asks Ray whether a trial waits, while the scorer holds a share


def warm_scorer(config: SweepConfig) -> WarmScorer | None:
    """A scorer for the sweep's tail: on GPUs only (on CPU it runs in the driver after the sweep, which stays
    free of torch meanwhile), and only when no searched key changes how the base model scores."""
    if config.resources.gpu == 0 or set(config.space) & {*SCORING_FIELDS, "lora_targets"}:
        return None
    return WarmScorer(config.trial.to_dict(), config.test_max_examples,
                      {"cpu": config.resources.cpu, "gpu": config.resources.gpu})


class ScorerInTail(tune.Callback):
    """Starts `scorer` in the first share freed once no trial is left to start; releases it to a waiting one."""

    def __init__(self, scorer: WarmScorer, trials: int):
        self.scorer, self.trials = scorer, trials
        self.started = False
        self.checked = 0.0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.share_freed(trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.share_freed(trials)

    def share_freed(self, trials) -> None:
        if self.started or len(trials) < self.trials or any(t.status == "PENDING" for t in trials):
            return
        self.started = True
        self.scorer.start()

    def on_step_end(self, iteration, trials, **info):
        if self.scorer.actor is None or time.monotonic() - self.checked < CHECK_EVERY_S:
            return
        self.checked = time.monotonic()
        if any(group["state"] in WAITING for group in ray.util.placement_group_table().values()):
            self.scorer.release("a trial waits for resources; the scorer loads after the sweep instead")
