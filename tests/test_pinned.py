"""Pinned numbers (as torchtune pins its recipes' losses): a fixed tiny trial on CPU must reproduce its
recorded per-epoch train loss and validation metrics to 1e-5. A silent change to the loop, the data
order, the schedule, the model or the metrics fails here.

After a deliberate change, re-record with `RUNNER_PIN=1 python -m pytest tests/test_pinned.py` and say
why in the commit.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from runner.config import TrialConfig
from runner.train.loop import train_trial

pytestmark = pytest.mark.slow  # it trains (a few seconds)

PINNED = Path(__file__).with_name("pinned") / "tiny_trial.json"
TRIAL = TrialConfig(task="easy_vqa", model="tiny", precision="fp32", device="cpu", lora_rank=8, learning_rate=3e-3,
                    n_samples=96, batch_size=16, epochs=2, max_eval_examples=48, eval_batch_size=48, seed=0,
                    cache_image_features=False)
TIMING = {"train_samples_per_second", "start_seconds"}


def test_a_fixed_tiny_trial_reproduces_its_recorded_numbers(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the quick-start's worker setting; summation order follows the thread count
    try:
        history = train_trial(TRIAL, tmp_path)
    finally:
        torch.set_num_threads(threads)
    got = [{key: value for key, value in epoch.items() if key not in TIMING} for epoch in history]
    if os.environ.get("RUNNER_PIN"):
        PINNED.write_text(json.dumps({"trial": TRIAL.to_dict(), "epochs": got}, indent=2) + "\n")
    pinned = json.loads(PINNED.read_text())
    assert pinned["trial"] == TRIAL.to_dict()
    assert [sorted(epoch) for epoch in got] == [sorted(epoch) for epoch in pinned["epochs"]]
    for ours, recorded in zip(got, pinned["epochs"]):
        for key in recorded:
            torch.testing.assert_close(ours[key], recorded[key], rtol=0, atol=1e-5, msg=lambda m, k=key: f"{k}: {m}")
