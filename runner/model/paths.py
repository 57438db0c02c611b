"""Where a model and this node's cache are: names only, no torch or transformers (a sweep's driver checks
its inputs and holds the local cluster with these, then leaves the model to its trials)."""

from __future__ import annotations

import os
from pathlib import Path

from runner.tiny import TINY_MODEL


def cache_dir() -> Path:
    """This node's cache (image features, quantised weights), kept between runs: RUNNER_CACHE or ~/.cache/blip2-lora-runner."""
    return Path(os.environ.get("RUNNER_CACHE", Path.home() / ".cache" / "blip2-lora-runner"))


def resolve_model(name: str) -> str:
    """`tiny` → the shipped tiny model's directory (verified); anything else (hub id, path) as given."""
    if name != TINY_MODEL:
        return name
    from runner.tiny import model_dir

    return str(model_dir())
