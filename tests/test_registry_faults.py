"""The champion guard against a failing registry: a real `mlflow server` behind a small fault-injecting
HTTP proxy on 127.0.0.1 that answers 500, resets the connection or stalls when the champion is read.
Promotion must stop with one clear line (exit 1) and leave the alias where it was, then succeed once
the registry answers again."""

import http.server
import socket
import threading
import time

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from runner.cli import main
from runner.config import load_sweep
from runner.eval.held_out import TestScorer
from runner.registry.promote import best_trial_run, promote
from runner.sweep import state
from runner.tracking.client import Tracker
from tests.conftest import MODEL, SPACE, forward, mlflow_server

pytestmark = pytest.mark.slow  # starts a server

STALL_TIMEOUT = 2  # seconds: MLFLOW_HTTP_REQUEST_TIMEOUT while the proxy stalls (a stall is one either way)
CHAMPION_READS = ("registered-models/get", "registered-models/alias", "model-versions/get")


class FaultProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to `target`; while `fault` is set, champion reads get that fault."""

    daemon_threads = True

    def __init__(self, target_port: int):
        self.target_port, self.fault, self.faulted = target_port, None, 0
        super().__init__(("127.0.0.1", 0), Handler)


class Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def forward(self):
        proxy: FaultProxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if proxy.fault and any(read in self.path for read in CHAMPION_READS):
            proxy.faulted += 1
            if proxy.fault == "500":
                self.send_response(500)
                self.send_header("Content-Length", "21")
                self.end_headers()
                self.wfile.write(b"Internal Server Error")
                return
            if proxy.fault == "reset":
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                self.connection.close()
                return
            time.sleep(STALL_TIMEOUT * 2.5)  # "stall": longer than the client's timeout
            return
        forward(self, proxy.target_port, body)

    do_GET = do_POST = do_PATCH = do_DELETE = forward


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """A server with a finished sweep of one scored, registered trial (v1, test exact match 0.42) and a
    better champion (v2, 0.999, same test questions); the proxy in front of it."""
    tmp_path = tmp_path_factory.mktemp("registry")
    with mlflow_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts") as base:
        port = int(base.rsplit(":", 1)[1])
        proxy = FaultProxy(port)
        threading.Thread(target=proxy.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{proxy.server_address[1]}"
        client = MlflowClient(base)
        experiment = client.create_experiment("quickstart")
        sweep = client.create_run(experiment, tags={"runner.kind": "sweep", "runner.sweep": "guarded"})
        trial = client.create_run(experiment, tags={"runner.kind": "trial", "runner.sweep_run_id": sweep.info.run_id})
        client.log_metric(trial.info.run_id, "best_val_exact_match", 0.5)
        client.set_terminated(trial.info.run_id, "FINISHED")
        client.create_registered_model(MODEL)
        tags = {"test_fingerprint": "same-questions", "task": "easy_vqa"}
        for run_id, score in ((trial.info.run_id, "0.42"), (sweep.info.run_id, "0.999")):
            client.create_model_version(MODEL, f"runs:/{run_id}/model", run_id=run_id,
                                        tags={**tags, "test_exact_match": score})
        client.set_registered_model_alias(MODEL, "champion", "2")
        overrides = ["name=guarded", f"storage_path={tmp_path / 'ray'}", f"tracking_uri={url}"]
        state.write(load_sweep(SPACE, overrides), {"sweep_run_id": sweep.info.run_id, "tracking_uri": url,
                                                   "experiment": "quickstart"})
        yield {"proxy": proxy, "client": client, "overrides": overrides, "url": url,
               "sweep_run_id": sweep.info.run_id}
        proxy.shutdown()


@pytest.mark.parametrize("fault", ["500", "reset", "stall"])
def test_a_failing_registry_never_moves_the_champion(registry, fault, monkeypatch):
    if fault == "stall":
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", str(STALL_TIMEOUT))
    registry["proxy"].fault = fault
    result = CliRunner().invoke(main, ["promote", SPACE, *registry["overrides"]])
    assert registry["proxy"].faulted, "the fault was never injected"
    assert result.exit_code == 1, (result.output[-2000:], result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "champion left untouched" in lines[0], result.stderr[-2000:]
    assert registry["client"].get_model_version_by_alias(MODEL, "champion").version == "2"

    registry["proxy"].fault = None  # the registry answers again: the re-run decides on the real scores
    tracker = Tracker(registry["url"], "quickstart")
    best = best_trial_run(tracker, registry["sweep_run_id"], "val_exact_match", "max")
    unused = TestScorer(lambda: pytest.fail("v1 is registered and scored: nothing to score again"), None, None)
    outcome = promote(tracker, best=best, sweep_run_id=registry["sweep_run_id"], metric="val_exact_match",
                      mode="max", model_name=MODEL, scorer=unused)
    assert not outcome.moved and "v1 test_exact_match=0.4200 does not beat champion v2" in outcome.message
    assert registry["client"].get_model_version_by_alias(MODEL, "champion").version == "2"
