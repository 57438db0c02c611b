"""Shared fixtures. The tiny BLIP-2 is built once per test session into a private cache.

Real over mock: the tests run the real CLI, Ray, MLflow and PEFT. What cannot exist here is mocked
in the test that needs it and says so (the hub, a GPU).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    """Every test (and every CLI subprocess) builds and finds the tiny model in one session cache."""
    cache = Path(os.environ.get("RUNNER_TEST_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["RUNNER_CACHE"] = str(cache)
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    os.environ.setdefault("TQDM_DISABLE", "1")
    return cache


@pytest.fixture(scope="session")
def tiny_model(private_cache) -> Path:
    from runner.model import resolve_model

    return Path(resolve_model("tiny"))


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 900, env: dict | None = None):
    """Run the real `runner` console entry point in a subprocess; return the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout, env={**os.environ, **(env or {})})
