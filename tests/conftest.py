"""Shared fixtures. The expensive things run once per pytest run and several tests read their outcome:
`store` (the quick-start sweep, then a weak Optuna sweep killed and resumed, one MLflow store) and `faults`
(one sweep into which a worker kill, a diverging loss and a driver kill are put, then a promotion killed while
it scores and two promotions at once). They run in two pytest-xdist workers, each with a heavy share of its own
(`pytest_collection_modifyitems`).

Real over mock: the tests run the real CLI, Ray, MLflow and PEFT. What cannot exist here is mocked in the
test that needs it and says so (the hub, a GPU). `-m "not slow"` runs only what needs no Ray cluster, no
server and no training (about a minute).
"""

import errno
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager, nullcontext, suppress
from pathlib import Path

import pytest

from runner.pipeline import MLFLOW_SERVER_ENV

REPO = Path(__file__).resolve().parents[1]
MODEL = "tiny-blip2-easy-vqa"
SPACE = str(REPO / "search_spaces" / "quickstart.yaml")
# The weak sweep is also the killed Optuna search: two trials, one at a time, two epochs each, learning rates
# too small to beat the quick-start. Its driver is interrupted (SIGINT) in the first trial, so the second trial is
# proposed after `--resume` by the searcher state Tune saved (tests/test_search.py checks it against an
# uninterrupted search); the space also takes the Q-Former target and the derived alpha through a real sweep.
WEAK = ["search=optuna", "num_samples=2", "trial.epochs=2", "trial.max_eval_examples=50",
        "scheduler.type=none", "max_concurrent_trials=1",
        "space={lora_rank: {choice: [4, 8, 16]}, lora_alpha: {times: [2, lora_rank]}, "
        "learning_rate: {loguniform: [1.0e-5, 1.0e-4]}, n_samples: {choice: [64]}, "
        "lora_targets: {choice: ['q,v', 'q,v,query,value']}}"]


# The suite runs in two pytest-xdist workers (pyproject.toml: `-n 2 --dist loadgroup`). Each worker's heavy share is
# one xdist group (a group runs in one worker, so its session fixture runs once): a shared sweep and a cluster test,
# paired so that the two shares take about as long (2026-12-06, this 2-core machine: store 303 s + node loss 125 s;
# faults 329 s + two-node cluster 133 s). Left to xdist, one worker took both cluster tests and the recipe test
# (it hands a unit to whichever worker has at most two tests pending). The rest is handed out as the workers free
# up, longest first. Tests sharing a module-scoped fixture share a worker too, or the second worker builds it again.
# Each worker has its own feature cache and so its own local cluster lock (`private_cache`); two sweeps at once on
# this machine is what LOCAL_CLUSTER_ENV allows for.
HEAVY_SHARES = {"store": "store", "test_node_loss.py": "store", "faults": "faults", "test_multinode.py": "faults"}
LONGEST_FIRST = ("store", "faults", "test_tiny.py::test_a_shortened_recipe", "test_train.py")


def xdist_group(item: pytest.Item) -> str | None:
    """The group `item` runs in: its heavy share, else its module's if it uses a module-scoped fixture."""
    for key, group in HEAVY_SHARES.items():
        if key in getattr(item, "fixturenames", ()) or item.nodeid.startswith(f"tests/{key}"):
            return group
    fixtures = getattr(item, "_fixtureinfo", None)
    if fixtures and any(defs[-1].scope == "module" for defs in fixtures.name2fixturedefs.values()):
        return item.nodeid.split("::")[0]
    return None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    groups = {item.nodeid: xdist_group(item) for item in items}

    def rank(item: pytest.Item) -> int:
        for position, key in enumerate(LONGEST_FIRST):
            if groups[item.nodeid] == key or item.nodeid.startswith(f"tests/{key}"):
                return position
        return len(LONGEST_FIRST)

    for item in items:
        if groups[item.nodeid]:
            item.add_marker(pytest.mark.xdist_group(groups[item.nodeid]))
    items.sort(key=rank)  # stable: the rest keep their file order


def pytest_configure(config: pytest.Config) -> None:
    """Refuse to run each shared fixture once per worker (the suite's time doubles, silently): pytest-xdist 3.8
    puts a test's group into `Item._nodeid`, which pytest 9.2 no longer reads (CI, 2026-12-03: 20 min, not 15)."""
    from _pytest.nodes import Node

    if getattr(config.option, "dist", "no") == "loadgroup" and "_nodeid" not in Node.__slots__:
        raise pytest.UsageError(f"pytest {pytest.__version__} ignores pytest-xdist's --dist loadgroup: "
                                "install requirements.txt's pytest")


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory) -> Path:
    """Every test (and every CLI subprocess) keeps its image-feature cache in one session folder."""
    given = os.environ.get("RUNNER_TEST_CACHE")  # one per xdist worker: its cluster lock is in there
    cache = Path(given) / os.environ.get("PYTEST_XDIST_WORKER", "main") if given else tmp_path_factory.mktemp("cache")
    os.environ["RUNNER_CACHE"] = str(cache)
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # As the CLI sets them (runner/cli.py): a refused MLflow call fails in seconds, not after minutes of retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    os.environ.setdefault("TQDM_DISABLE", "1")
    return cache


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_worker() -> None:
    """Two xdist workers on two cores: torch in each (and in every CLI it starts) computes on one thread. With
    torch's default of one per core, in-process training beside another worker's sweep thrashed: the tiny
    recipe's test took 109 s instead of ~22 s (2026-12-06). A sweep's Train workers set their own (the trial's
    CPU share)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ.setdefault("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    from runner.model.paths import resolve_model

    return Path(resolve_model("tiny"))


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 900, env: dict | None = None):
    """Run the real `runner` console entry point in a subprocess; return the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=timeout, env={**os.environ, **(env or {})})


def cli_process(*args: str, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """The CLI started in its own process group (so a test can kill it with everything it started)."""
    return subprocess.Popen([sys.executable, "-m", "runner.cli", *args], cwd=cwd, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, **(env or {})})


# The quick-start space, smaller: two trials of two epochs (the first two the full space draws), fewer
# questions scored, one at a time so that ASHA's decision is the same every run (it compares a trial with
# those that reached the rung before it): it stops the second. Each trial start costs ~35 s here, its
# training a few: a third trial would prove nothing the two do not.
STORE_TEST_QUESTIONS = 200  # the store's sweeps score (and tests/test_sweep.py re-scores) this many test questions
QUICK = ["num_samples=2", "trial.epochs=2", "trial.max_eval_examples=200", "max_concurrent_trials=1"]


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    """The quick-start sweep (the README's main command, smaller, next to another Ray instance), then a weak
    sweep, into one MLflow store (tests/test_sweep.py, tests/test_report_ui.py, tests/test_search.py): the
    quick-start's best trial becomes the champion; the weak one (an Optuna search whose driver is interrupted
    and resumed) is registered, scored on the same test questions, and does not move the alias."""
    from mlflow import MlflowClient

    root = tmp_path_factory.mktemp("sweeps")
    uri = f"sqlite:///{root / 'mlruns' / 'mlflow.db'}"
    (root / "mlruns").mkdir()
    common = [f"storage_path={root / 'ray'}", f"tracking_uri={uri}", f"test_max_examples={STORE_TEST_QUESTIONS}"]
    outputs, errors, timings = {}, {}, {}
    for name, extra in (("quickstart", QUICK), ("weak", WEAK)):
        started = time.time()
        args = ["tune", SPACE, f"name={name}", *common, *extra]
        if name == "weak":
            interrupt_in_first_trial(args, root, uri)
            args.append("--resume")
        with other_ray_instance() if name == "quickstart" else nullcontext():
            result = run_cli(*args, cwd=root, timeout=1200)
        assert result.returncode == 0, (name, result.stdout[-3000:], result.stderr[-5000:])
        outputs[name] = result.stdout
        errors[name] = result.stderr
        (root / f"{name}.out").write_text(result.stdout + result.stderr)  # to read after a run
        timings[name] = round(time.time() - started, 1)
    (root / "timings.json").write_text(json.dumps(timings, indent=2))
    return {"uri": uri, "root": root, "common": common, "client": MlflowClient(uri), "stdout": outputs,
            "stderr": errors}


@contextmanager
def other_ray_instance():
    """Another Ray instance on this machine (a user's own, or a second sweep's) while a sweep runs: the sweep's
    processes must still find their own cluster, or Ray Train's placement-group cleaner fails and the
    quick-start's second trial never gets its worker (runner/sweep/tuner.py `own_cluster_env`)."""
    from ray.cluster_utils import Cluster

    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway cluster (its processes inherit it)
        # No dashboard: a second cluster's GCS is what makes an address-less State API call ambiguous.
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    try:
        yield
    finally:
        cluster.shutdown()


def interrupt_in_first_trial(args: list[str], cwd: Path, uri: str) -> None:
    """Start the CLI with `args`; interrupt it (SIGINT, as Ctrl-C or `kill -INT`) once its first trial has
    logged an epoch (and before that trial has finished): it saves the sweep's state, says how to resume,
    promotes nothing and exits 130."""
    epochs, finished = epochs_logged(uri), len(finished_runs(uri))
    log = kill_when(args, cwd, lambda: epochs_logged(uri) > epochs, signal.SIGINT)
    assert epochs_logged(uri) > epochs and len(finished_runs(uri)) == finished, log[-3000:]
    assert "interrupted with 0 of 2 trials finished" in log and "--resume` finishes it" in log, log[-3000:]
    assert "promotion:" not in log, log[-3000:]


def kill_when(args: list[str], cwd: Path, ready, how: signal.Signals = signal.SIGKILL, timeout: float = 600) -> str:
    """Start the CLI with `args`; once `ready()`, SIGKILL it with everything it started (its process group:
    the local Ray cluster too) — or send the CLI alone `how` (SIGINT: it must end by itself, exit 130);
    returns what it printed. A CLI that ended before the moment fails the test."""
    driver = cli_process(*args, cwd=cwd)
    log = Collected(driver.stdout)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and driver.poll() is None and not ready():
            time.sleep(0.2)
        assert driver.poll() is None, (f"it ended (exit {driver.returncode}) before the moment came", log.text()[-3000:])
        if how == signal.SIGKILL:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait(30)
        else:
            driver.send_signal(how)
            assert driver.wait(120) == 130, log.text()[-3000:]
            with suppress(ProcessLookupError):  # anything of its Ray cluster left behind
                os.killpg(driver.pid, signal.SIGKILL)
        return log.text()
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)


# Trial order (a grid, one trial at a time): killed worker, diverging loss, good. (Running out of GPU memory
# takes the same path as a diverging loss; its message is tested in-process: tests/test_train.py.)
FAULT_LRS = {"killed_worker": 3e-3, "diverged": 1e6, "good": 5e-3}
FAULT_SPACE = ("space={learning_rate: {grid: [%s]}, n_samples: {choice: [800]}}"
               % ", ".join(f"{lr:.1e}" for lr in FAULT_LRS.values()))


@pytest.fixture(scope="session")
def faults(tiny_model, tmp_path_factory):
    """One sweep, faults injected for real (tests/test_faults.py reads each outcome), one trial at a time:
    1. the first trial's Train worker is SIGKILLed in its epoch 2 (Ray Train restarts it from epoch 1);
    2. the second trial's loss diverges (learning rate 1e6); 3. right after that trial has ended, the sweep
       driver is SIGKILLed with everything it started, and `runner tune --resume` resumes the sweep (the
       third trial); 4. the storage disk (a real tmpfs) fills in that trial's epoch 2: the sweep stops, the
       space is freed, and `--resume` finishes it; 5. a `runner promote` is SIGKILLed while it scores the
       test questions; 6. then two `runner promote` run at once."""
    root = tmp_path_factory.mktemp("faults")
    with small_disk(root / "disk") as disk:
        yield run_faults(root, disk)


@contextmanager
def small_disk(mount_point: Path, megabytes: int = 40):
    """A tmpfs of `megabytes` at `mount_point` (root only: else a plain folder, and `mounted` says why not)."""
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    try:
        yield {"path": mount_point, "mounted": mounted.returncode == 0, "why": mounted.stderr.strip()}
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=True)  # lazy: a Ray log may be open


def fill_disk(folder: Path) -> Path:
    """Write a file in `folder` until its disk is full to the last byte, as another program would; its path."""
    filler = folder / "filler"
    with filler.open("wb") as handle:
        try:
            while True:
                handle.write(b"\0" * 2**16)
                handle.flush()
        except OSError as error:
            assert error.errno == errno.ENOSPC, error
    return filler


def run_faults(root: Path, disk: dict) -> dict:
    uri = f"sqlite:///{root / 'mlflow.db'}"
    args = [SPACE, "name=faults", f"storage_path={disk['path'] / 'ray'}", f"tracking_uri={uri}", "num_samples=1",
            "max_failures=1", "trial.epochs=2", "trial.max_eval_examples=100", "max_concurrent_trials=1",
            "test_max_examples=200", "scheduler.type=none", FAULT_SPACE]
    timings, started = {}, time.time()
    # -v: the test reads the Train workers' own lines (their pids, "resumed from"), which quiet mode keeps
    # in Ray's log files.
    driver = cli_process("-v", "tune", *args, "--no-promote", cwd=root)
    log = Collected(driver.stdout)
    killed_lr = str(FAULT_LRS["killed_worker"])
    killed_worker = None
    try:
        deadline = time.time() + 600
        diverged_lr = str(FAULT_LRS["diverged"])
        while time.time() < deadline and driver.poll() is None and not failed_runs(uri, diverged_lr):
            time.sleep(0.5)
            if killed_worker is None and epochs_logged(uri, killed_lr):  # epoch 1 is in MLflow: it is in epoch 2
                killed_worker = worker_of(log.text(), killed_lr)
                os.kill(killed_worker, signal.SIGKILL)
                timings["worker killed"] = time.time() - started
        assert killed_worker is not None and finished_runs(uri, killed_lr), log.text()[-3000:]
        assert failed_runs(uri, diverged_lr), log.text()[-3000:]
        finished_before_kill = {**finished_runs(uri), **failed_runs(uri)}
        os.killpg(driver.pid, signal.SIGKILL)  # the driver and the local Ray cluster it started
        driver.wait(30)
        timings["driver killed"] = time.time() - started
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
    disk_full = fill_disk_during_last_trial(args, root, uri, disk) if disk["mounted"] else None
    timings["disk full: sweep stopped"] = time.time() - started
    resumed = run_cli("tune", *args, "--no-promote", "--resume", cwd=root)
    assert resumed.returncode == 0, resumed.stdout[-3000:]
    timings["resumed sweep done"] = time.time() - started
    killed_promotion = kill_while_scoring(args, root)
    timings["promotion killed"] = time.time() - started
    promotes = [cli_process("promote", *args, cwd=root) for _ in range(2)]
    promoted = [process.communicate(timeout=900)[0] for process in promotes]
    assert [process.returncode for process in promotes] == [0, 0], [out[-2000:] for out in promoted]
    timings["promotions done"] = time.time() - started
    (root / "first_driver.log").write_text(log.text())
    (root / "timings.json").write_text(json.dumps(timings, indent=2))
    return {"uri": uri, "root": root, "storage": disk["path"] / "ray", "first_driver": log.text(),
            "killed_worker": killed_worker, "finished_before_kill": finished_before_kill, "disk_full": disk_full,
            "disk_why": disk["why"], "killed_promotion": killed_promotion, "promoted": promoted}


def fill_disk_during_last_trial(args: list[str], cwd: Path, uri: str, disk: dict) -> dict:
    """`runner tune --resume`; once the resumed trial has logged epoch 1, fill the storage disk to the last
    byte. Returns what the stopped sweep left: its exit code, output and Tune's experiment state files
    (JSON; its searcher's are pickles), read before the filler is removed again."""
    good_lr = str(FAULT_LRS["good"])
    driver = cli_process("tune", *args, "--no-promote", "--resume", cwd=cwd)
    log = Collected(driver.stdout)
    filler = disk["path"] / "filler"  # fill_disk's
    try:
        deadline = time.time() + 600
        while time.time() < deadline and driver.poll() is None and not epochs_logged(uri, good_lr):
            time.sleep(0.5)
        assert epochs_logged(uri, good_lr) == 1, log.text()[-3000:]
        fill_disk(disk["path"])
        returncode = driver.wait(300)
        (cwd / "disk_full_driver.log").write_text(log.text())
        states = {path.name: path.read_text() for path in (disk["path"] / "ray" / "faults").glob("experiment_state-*")}
        return {"returncode": returncode, "output": log.text(), "states": states,
                "epochs_when_stopped": epochs_logged(uri, good_lr)}
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
        filler.unlink(missing_ok=True)  # space freed: the resume after this finishes the sweep


def kill_while_scoring(args: list[str], cwd: Path) -> str:
    """`runner promote` SIGKILLed with everything it started once it scores the test questions (-v: its
    "image features" line), before it registers anything; returns what it printed."""
    promotion = cli_process("-v", "promote", *args, cwd=cwd)
    log = Collected(promotion.stdout)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and promotion.poll() is None and "image features:" not in log.text():
            time.sleep(0.2)
        os.killpg(promotion.pid, signal.SIGKILL)
        assert promotion.wait(30) == -signal.SIGKILL, log.text()[-3000:]  # killed, not ended by itself
    finally:
        if promotion.poll() is None:
            os.killpg(promotion.pid, signal.SIGKILL)
    return log.text()


def worker_of(log: str, learning_rate: str) -> int:
    """The pid of the Train worker training with `learning_rate` (it logs its settings when it starts)."""
    pids = re.findall(rf"RayTrainWorker pid=(\d+)\).*learning rate {re.escape(learning_rate)}$", log, re.M)
    return int(pids[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def mlflow_server_command(backend_uri: str, artifacts: Path, host: str, port: int) -> list[str]:
    """One worker process, not MLflow's default four: each imports the server (~5 CPU-seconds), and one
    serves these tests."""
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, "--host", host,
            "--port", str(port), "--artifacts-destination", str(artifacts), "--workers", "1"]


@contextmanager
def mlflow_server(backend_uri: str, artifacts: Path, port: int | None = None):
    """A real `mlflow server` on loopback over `backend_uri`; yields its base URL, stops it after."""
    port = port or free_port()
    process = subprocess.Popen(mlflow_server_command(backend_uri, artifacts, "127.0.0.1", port),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                               env={**os.environ, **MLFLOW_SERVER_ENV})  # as `runner ui`: no job-queue processes
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
        os.killpg(process.pid, signal.SIGTERM)  # the server and its workers
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:  # a loaded machine: its workers may not drain in time
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)


def forward(handler, target_port: int, body: bytes) -> None:
    """Pass `handler`'s request (an http.server handler) to 127.0.0.1:`target_port` and its answer back: the
    test proxies in front of a real `mlflow server` (tests/test_registry_faults.py, bench/slow_tracking.py)."""
    import http.client

    upstream = http.client.HTTPConnection("127.0.0.1", target_port, timeout=120)
    headers = {k: v for k, v in handler.headers.items() if k.lower() not in ("host", "content-length")}
    upstream.request(handler.command, handler.path, body=body or None, headers=headers)
    response = upstream.getresponse()
    data = response.read()
    handler.send_response(response.status)
    for key, value in response.getheaders():
        if key.lower() not in ("content-length", "transfer-encoding", "connection"):
            handler.send_header(key, value)
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


class Collected:
    """A child's output, read by a thread as it comes (so the child never blocks on a full pipe)."""

    def __init__(self, stream):
        self.lines: list[str] = []
        threading.Thread(target=self.read, args=(stream,), daemon=True).start()

    def read(self, stream) -> None:
        for line in stream:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)


def count(uri: str, query: str) -> list[tuple]:
    """Rows of `query`: poll a SQLite store read-only (an MlflowClient here could race the sweep creating the tables)."""
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.exists():
        return []
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as connection:
            return connection.execute(query).fetchall()
    except sqlite3.OperationalError:  # tables not created yet, or locked for a moment
        return []


def with_lr(learning_rate: str | None) -> str:
    return (f" and run_uuid in (select run_uuid from params where key = 'learning_rate' and value = '{learning_rate}')"
            if learning_rate else "")


def epochs_logged(uri: str, learning_rate: str | None = None) -> int:
    """Epochs in MLflow (of the trial with `learning_rate`, if given)."""
    rows = count(uri, "select count(*) from metrics where key = 'train_loss'" + with_lr(learning_rate))
    return rows[0][0] if rows else 0


def finished_runs(uri: str, learning_rate: str | None = None, status: str = "FINISHED") -> dict[str, int]:
    """Trial runs of `status` (of the trial with `learning_rate`, if given): run id -> end time."""
    rows = count(uri, f"select run_uuid, end_time from runs where status = '{status}' and run_uuid in (select "
                      "run_uuid from tags where key = 'runner.kind' and value = 'trial')" + with_lr(learning_rate))
    return dict(rows)


def failed_runs(uri: str, learning_rate: str | None = None) -> dict[str, int]:
    return finished_runs(uri, learning_rate, status="FAILED")
