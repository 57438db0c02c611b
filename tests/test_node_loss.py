"""A real multi-host cluster on one machine, and a worker node lost mid-trial.

Three hosts, each its own network namespace (`ip netns`) with its own IP and Ray `--temp-dir`, joined by veth
pairs on a bridge inside the head's namespace (no route out of them: their traffic stays among them): the Ray
head with the sweep driver and a real `mlflow server`, and two GPU workers. The driver joins the cluster by
the head's address over that network and tracks to the server there (the test reads the server's own
SQLite store, since nothing outside the namespaces reaches it). Two trials, one on each GPU node: a short one
ends first, and the sweep's test scorer loads in the GPU it freed (runner/sweep/tail.py). Once the long trial
has logged its first epoch, every process in the namespace of the node that trains it is SIGKILLed (its
raylet, its workers): the scorer gives its GPU back, Ray Train restarts the trial's worker on the other node
from the last checkpoint (shared storage: this machine's disk), the sweep finishes, the trial's MLflow run has
each epoch once, and the champion is registered once.

What cannot exist here: GPUs. The workers declare one logical GPU each; the tiny model trains on CPU in fp32.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from mlflow import MlflowClient

from runner.pipeline import MLFLOW_SERVER_ENV
from tests.conftest import MODEL, SPACE, Collected, count, mlflow_server_command

pytestmark = pytest.mark.slow

SUBNET = "10.213.7"
# The two trials' training questions per epoch: the long one trains long enough (3 epochs of ~15 s) to
# outlast the short one, which may start 10-20 s after it on a busy machine.
SHORT, LONG = 60, 4000
RAY = str(Path(sys.executable).with_name("ray"))


def sh(*args: str) -> None:
    subprocess.run(args, check=True, capture_output=True, text=True)


@contextmanager
def hosts(names: tuple[str, ...]):
    """Network namespaces `names[0]` (holding the bridge) and the rest, on SUBNET; yields name -> (ns, ip)."""
    tag = os.getpid() % 100000
    made: dict[str, tuple[str, str]] = {}
    try:
        for index, name in enumerate(names):
            namespace, address = f"rt{tag}-{name}", f"{SUBNET}.{index + 2}"
            sh("ip", "netns", "add", namespace)
            made[name] = (namespace, address)
            sh("ip", "netns", "exec", namespace, "ip", "link", "set", "lo", "up")
            if index == 0:
                sh("ip", "netns", "exec", namespace, "ip", "link", "add", "br0", "type", "bridge")
                sh("ip", "netns", "exec", namespace, "ip", "addr", "add", f"{address}/24", "dev", "br0")
                sh("ip", "netns", "exec", namespace, "ip", "link", "set", "br0", "up")
                continue
            head = made[names[0]][0]
            sh("ip", "link", "add", f"v{index}", "netns", head, "type", "veth", "peer", "name", "eth0",
               "netns", namespace)
            sh("ip", "netns", "exec", head, "ip", "link", "set", f"v{index}", "master", "br0", "up")
            sh("ip", "netns", "exec", namespace, "ip", "addr", "add", f"{address}/24", "dev", "eth0")
            sh("ip", "netns", "exec", namespace, "ip", "link", "set", "eth0", "up")
    except (subprocess.CalledProcessError, FileNotFoundError) as error:
        remove(made)
        why = error.stderr.strip() if isinstance(error, subprocess.CalledProcessError) else error
        pytest.skip(f"cannot make network namespaces here ({why}): this test needs root and iproute2")
    try:
        yield made
    finally:
        remove(made)


def kill_all_in(namespace: str) -> list[int]:
    """SIGKILL every process in `namespace` (a host that dies at once); the pids killed."""
    listed = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    pids = [int(pid) for pid in listed]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def remove(made: dict[str, tuple[str, str]]) -> None:
    for namespace, _ in reversed(list(made.values())):
        kill_all_in(namespace)
        subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
        shutil.rmtree(temp_dir(namespace), ignore_errors=True)


def in_namespace(namespace: str, *args: str) -> list[str]:
    return ["ip", "netns", "exec", namespace, *args]


def temp_dir(namespace: str) -> Path:
    """The host's Ray `--temp-dir`: short, since Ray's socket paths under it must fit in 107 characters."""
    return Path("/tmp") / namespace


def start_mlflow_server(namespace: str, address: str, backend: str, artifacts: Path, port: int = 5000) -> str:
    """A real `mlflow server` on the host `namespace` (as tests/conftest.py's), started; its URL."""
    subprocess.Popen(in_namespace(namespace, *mlflow_server_command(backend, artifacts, address, port)),
                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **MLFLOW_SERVER_ENV})
    return f"http://{address}:{port}"


def wait_for_health(namespace: str, url: str) -> None:
    """Until the server at `url` answers /health from inside the host `namespace`."""
    probe = f"import urllib.request; urllib.request.urlopen('{url}/health', timeout=5)"
    deadline = time.time() + 180
    while subprocess.run(in_namespace(namespace, sys.executable, "-c", probe), capture_output=True).returncode:
        assert time.time() < deadline, f"mlflow server on {url} did not answer /health"
        time.sleep(1)


def test_a_worker_node_lost_mid_trial_resumes_on_the_other_node(tiny_model, tmp_path):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # a throwaway cluster
    with hosts(("head", "gpu1", "gpu2")) as net:
        (head, head_ip), port = net["head"], 6379
        backend = f"sqlite:///{tmp_path / 'mlflow.db'}"
        uri = start_mlflow_server(head, head_ip, backend, tmp_path / "artifacts")  # it starts while Ray does
        # The head schedules no trial work (no GPU); each worker node has one logical GPU and a CPU for its worker.
        subprocess.run(in_namespace(head, RAY, "start", "--head", f"--node-ip-address={head_ip}", f"--port={port}",
                                    "--num-cpus=1", "--num-gpus=0", f"--temp-dir={temp_dir(head)}",
                                    "--dashboard-host", head_ip, "--disable-usage-stats"),
                       check=True, capture_output=True, env=env, timeout=180)
        workers = [subprocess.Popen(in_namespace(net[name][0], RAY, "start", f"--address={head_ip}:{port}",
                                                 f"--node-ip-address={net[name][1]}", "--num-cpus=1", "--num-gpus=1",
                                                 f"--temp-dir={temp_dir(net[name][0])}", "--disable-usage-stats"),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
                   for name in ("gpu1", "gpu2")]  # the two join at once
        for worker in workers:
            output, _ = worker.communicate(timeout=180)
            assert worker.returncode == 0, output[-3000:]
        wait_for_health(head, uri)
        # -v: the test reads which node's Train worker trains (Ray prefixes a remote worker's lines with its IP).
        driver = subprocess.Popen(
            in_namespace(head, sys.executable, "-m", "runner.cli", "-v", "tune", SPACE, "name=node-loss",
                         f"storage_path={tmp_path / 'shared'}", f"tracking_uri={uri}", "resources.gpu=1",
                         "resources.cpu=1", "num_samples=1", "trial.epochs=3", "scheduler.type=none",
                         f"space={{learning_rate: {{grid: [0.004]}}, n_samples: {{grid: [{SHORT}, {LONG}]}}}}",
                         "test_max_examples=60", "trial.max_eval_examples=60", "--address", f"{head_ip}:{port}"),
            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log = Collected(driver.stdout)
        try:
            deadline = time.time() + 600
            while not (epochs_logged(backend, LONG) and "test scorer: loading" in log.text()) \
                    and time.time() < deadline and driver.poll() is None:
                time.sleep(0.5)  # the short trial has ended (the scorer holds its GPU), the long one trains
            assert epochs_logged(backend, LONG) in (1, 2) and "test scorer: loading" in log.text(), log.text()[-3000:]
            first = re.findall(rf"RayTrainWorker pid=\d+, ip=({re.escape(SUBNET)}\.\d+)\).* {LONG} training / ",
                               log.text())
            assert first, log.text()[-3000:]
            lost = next(name for name in ("gpu1", "gpu2") if net[name][1] == first[-1])
            survivor = next(name for name in ("gpu1", "gpu2") if name != lost)
            assert kill_all_in(net[lost][0]), "nothing ran on the node that trains the trial"
            assert driver.wait(900) == 0, log.text()[-3000:]
            # The restarted worker's own records, from the survivor's Ray log files (its streamed lines can be
            # lost when its last epoch is short and the sweep ends right after).
            survivor_logs = "".join(path.read_text(errors="replace") for path in
                                    (temp_dir(net[survivor][0])).rglob("*") if path.is_file() and path.suffix in (
                                        ".log", ".err", ".out"))
        finally:
            (tmp_path / "driver.log").write_text(log.text())  # for a failed run
            if driver.poll() is None:
                driver.kill()
            # (Not `ray stop`: it stops every Ray on the machine. Leaving `hosts` kills all in each namespace.)

    text = log.text()
    # The scorer gave the short trial's GPU back to the long one, whose worker restarted on that (the other)
    # node from the checkpoint of its last epoch.
    assert "test scorer: freed its GPU share (a trial waits for resources" in text, text[-3000:]
    assert re.search(r"resumed from \S+ after epoch [12]", survivor_logs), text[-3000:]
    client = MlflowClient(backend)  # the server's own store (the server itself is gone with the namespaces)
    experiment = client.get_experiment_by_name("quickstart")
    trials = client.search_runs([experiment.experiment_id], "tags.`runner.kind` = 'trial'")
    assert len(trials) == 2 and all(run.info.status == "FINISHED" for run in trials)
    for run in trials:  # nothing lost or doubled by the node's loss
        for key in ("train_loss", "val_exact_match"):
            assert sorted(m.step for m in client.get_metric_history(run.info.run_id, key)) == [1, 2, 3]
    versions = client.search_model_versions(f"name = '{MODEL}'")
    assert len(versions) == 1 and versions[0].run_id in {run.info.run_id for run in trials}
    assert client.get_model_version_by_alias(MODEL, "champion").version == versions[0].version
    # Promotion and the stages scored on a GPU worker — the survivor, where the long trial ended — not on the head.
    long = next(run for run in trials if run.data.params["n_samples"] == str(LONG))
    survivor_placement = long.data.tags["runner.placement"]
    assert survivor_placement.endswith("GPU 0") and versions[0].tags["test_placement"] == survivor_placement
    stages = client.search_runs([experiment.experiment_id], "tags.`runner.kind` = 'stage'")
    assert len(stages) == 2 and {run.data.tags["runner.placement"] for run in stages} == {survivor_placement}
    assert any((tmp_path / "artifacts").rglob("adapter_model.safetensors"))  # sent to the server over the veths


def epochs_logged(uri: str, n_samples: int) -> int:
    """Epochs in MLflow of the trial training `n_samples` questions."""
    rows = count(uri, "select count(*) from metrics where key = 'train_loss' and run_uuid in (select run_uuid from "
                      f"params where key = 'n_samples' and value = '{n_samples}')")
    return rows[0][0] if rows else 0
