"""Shared fixtures. The tiny BLIP-2 is built once per test session into a private cache.

Real over mock: the tests run the real CLI, Ray, MLflow and PEFT. What cannot exist here is mocked
in the test that needs it and says so (the hub, a GPU).
"""

import os
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
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


MODEL = "tiny-blip2-easy-vqa"
SPACE = str(REPO / "search_spaces" / "quickstart.yaml")
WEAK = ["num_samples=1", "trial.epochs=1", "space={n_samples: {choice: [40]}}",
        "trial.learning_rate=1e-4", "scheduler.type=none"]


@pytest.fixture(scope="session")
def store(tiny_model, tmp_path_factory):
    """Three real sweeps into one MLflow store (see tests/test_sweep.py), shared by the tests that read it."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("sweeps")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    (root / "mlruns").mkdir()
    common = [f"storage_path={root / 'ray'}", f"tracking_uri={uri}"]
    outputs = {}
    for name, extra in (("weak", WEAK), ("quickstart", []), ("weak2", WEAK)):
        result = run_cli("tune", SPACE, f"name={name}", *common, *extra, cwd=root, timeout=1200)
        assert result.returncode == 0, (name, result.stdout[-3000:], result.stderr[-5000:])
        outputs[name] = result.stdout
    return {"uri": uri, "root": root, "common": common, "client": MlflowClient(uri), "stdout": outputs}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, port: int | None = None):
    """A real `mlflow server` on loopback over `backend_uri`; yields its base URL, stops it after."""
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1",
         "--port", str(port), "--artifacts-destination", str(artifacts)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=5).status == 200:
                    break
            except OSError:
                if time.time() > deadline or process.poll() is not None:
                    raise RuntimeError(f"mlflow server on port {port} did not answer /health") from None
                time.sleep(0.5)
        yield base
    finally:
        os.killpg(process.pid, 15)  # the server and its workers
        process.wait(30)
