"""Cluster mode on one machine: a real two-node Ray cluster (two raylets, each with one logical GPU), a
real `mlflow server` as the head's tracking server, the CLI joining the cluster by address — and the
tracking server stopped mid-sweep and started again, with dummy secrets in the driver's environment. The
sweep trains on a team's own CSV whose column mapping, answer-type column and filter come from the space
file (the own-data end-to-end sweep: promotion and the report on data that is not a hub dataset).

What cannot exist here: GPUs. The nodes declare logical GPUs (Ray schedules them like real ones and
sets CUDA_VISIBLE_DEVICES); the tiny model then trains on CPU in fp32. Trials ask for a whole GPU each,
so the two that run at once must land on different nodes; every trial's MLflow run says where it ran.
"""

import time
import uuid
from pathlib import Path

import pytest
from mlflow import MlflowClient

from runner.tracking.callback import read_journal
from tests.conftest import (
    Collected,
    cli_process,
    epochs_logged,
    free_port,
    mlflow_server,
)
from tests.test_own_data import own_csv

pytestmark = pytest.mark.slow


@pytest.fixture
def two_node_cluster(monkeypatch):
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # a throwaway cluster (the nodes inherit it)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "num_gpus": 1})
    cluster.add_node(num_cpus=2, num_gpus=1)
    try:
        yield cluster
    finally:
        cluster.shutdown()


def own_data_space(tmp_path: Path) -> Path:
    """A team's own CSV (400 images, 1,194 training questions), mapped and filtered in the space file. The
    two trials differ in length (500 and 1,000 samples): the short one's epoch 2 ends well before the sweep."""
    data = own_csv(tmp_path / "ours", n_images=400)
    space = tmp_path / "ours.yaml"
    space.write_text(f"""name: ours
experiment: ours
registered_model: ours
trial:
  task: vqa
  data:
    path: {data}
    columns: {{image: img_path, question: q, answer: a, answer_type: kind}}
    filter: {{site: [A, B]}}
  model: tiny
  precision: fp32
  epochs: 2
  batch_size: 16
  max_eval_examples: 60
space: {{learning_rate: {{choice: [0.004]}}, n_samples: {{grid: [500, 1000]}}}}
num_samples: 1
scheduler: {{type: none}}
test_max_examples: 60
""")
    return space


def test_sweep_spreads_over_nodes_survives_a_tracking_outage_and_promotes(two_node_cluster, tiny_model, tmp_path):
    shared = tmp_path / "shared"  # stands in for the cluster's shared storage (NFS / S3)
    port = free_port()
    backend, artifacts = f"sqlite:///{tmp_path / 'head.db'}", tmp_path / "head-artifacts"
    # Tokens come from the environment (a URI with credentials is refused: tests/test_bad_input.py).
    secrets = {"HF_TOKEN": f"hf_{uuid.uuid4().hex}", "HUGGING_FACE_HUB_TOKEN": f"hf_{uuid.uuid4().hex}",
               "MLFLOW_TRACKING_TOKEN": uuid.uuid4().hex, "MLFLOW_TRACKING_PASSWORD": uuid.uuid4().hex}
    server = mlflow_server(backend, artifacts, port)
    server.__enter__()
    up = True
    driver = cli_process(  # -v: the test reads the workers' own epoch lines
        "-v", "tune", str(own_data_space(tmp_path)), "name=on-cluster", f"storage_path={shared}",
        f"tracking_uri=http://127.0.0.1:{port}", "resources.gpu=1", "resources.cpu=1", "max_concurrent_trials=2",
        "--address", two_node_cluster.address,
        cwd=tmp_path, env={"RAY_AUTH_MODE": "disabled", **secrets})
    log = Collected(driver.stdout)
    try:
        deadline = time.time() + 600
        while not epochs_logged(backend) and time.time() < deadline and driver.poll() is None:
            time.sleep(0.5)
        down_at = time.time()
        server.__exit__(None, None, None)  # MLflow goes away after the first epoch reached it
        up = False
        journal = shared / "on-cluster" / "mlflow_pending.jsonl"
        while not (epoch_2_queued := any(update["kind"] == "result" and update["epoch"] == 2
                                         for update in read_journal(journal))) and driver.poll() is None:
            time.sleep(0.5)  # the outage lasts until a trial has trained a whole epoch through it
        assert driver.poll() is None, ("the sweep ended during the outage", log.text()[-3000:])
        assert epoch_2_queued and "MLflow unreachable" in log.text()
        server = mlflow_server(backend, artifacts, port)
        server.__enter__()
        up, back_at = True, time.time()
        assert driver.wait(900) == 0, log.text()[-3000:]

        text = log.text()
        assert "MLflow reachable again: every queued update is written" in text
        assert not journal.exists()
        client = MlflowClient(f"http://127.0.0.1:{port}")
        experiment = client.get_experiment_by_name("ours")
        trials = client.search_runs([experiment.experiment_id], "tags.`runner.kind` = 'trial'")
        assert len(trials) == 2 and all(run.info.status == "FINISHED" for run in trials)
        trained_meanwhile = []
        for run in trials:  # nothing lost or doubled by the outage
            history = client.get_metric_history(run.info.run_id, "train_loss")
            assert sorted(m.step for m in history) == [1, 2]
            trained_meanwhile += [m.step for m in history if down_at <= m.timestamp / 1000 < back_at]
            assert "best_val_exact_match" in run.data.metrics
        assert 2 in trained_meanwhile, trained_meanwhile  # Tune's stamp (whole seconds): it ended in the outage
        placements = {run.data.tags["runner.placement"] for run in trials}
        nodes = {placement.split(" node ")[1].split()[0] for placement in placements}
        assert len(nodes) == 2, placements  # one trial on each node, each on its node's GPU 0
        assert all(placement.endswith("GPU 0") for placement in placements), placements

        # The adapters reached the server's artifact store (over HTTP, not a shared disk) and the
        # champion is registered there, loadable from its models:/ URI.
        assert any(artifacts.rglob("adapter_model.safetensors"))
        champion = client.get_model_version_by_alias("ours", "champion")
        adapter = Path(client.download_artifacts(champion.run_id, "checkpoint/adapter"))
        assert (adapter / "adapter_config.json").exists()
        assert client.get_run(champion.run_id).data.metrics["test_n"] == 6  # test.csv's six questions
        # Scored by a Ray actor holding one of the nodes' GPUs (the driver holds none), loaded while the second
        # trial still trained, in the GPU the first one freed; the stages scored there too (runner/sweep/tail.py).
        scored_on = champion.tags["test_placement"]
        assert scored_on.endswith("GPU 0") and scored_on.split(" node ")[1].split()[0] in nodes, scored_on
        assert f"test scoring on {scored_on} (loaded during the sweep)" in text
        stages = client.search_runs([experiment.experiment_id], "tags.`runner.kind` = 'stage'")
        assert len(stages) == 2 and {run.data.tags["runner.placement"] for run in stages} == {scored_on}
    finally:
        (tmp_path / "driver.log").write_text(log.text())  # for a failed run
        if driver.poll() is None:
            driver.kill()
        if up:
            server.__exit__(None, None, None)

    # The report names the mapping, and compares with no published figure (none exist for this data).
    report = (tmp_path / "runs" / "reports" / "on-cluster" / "report.md").read_text()
    assert "columns image=img_path, question=q, answer=a, answer_type=kind" in report
    assert "None shown" in report and "| Med-PaLM M 12B |" not in report

    # Tune's experiment state and the driver's sweep state sit on the shared storage: `--resume` finds both.
    assert (shared / "on-cluster" / "runner_sweep.json").exists()
    assert any((shared / "on-cluster").glob("experiment_state-*.json"))

    # No secret anywhere: the MLflow database and artifacts, the sweep's own output, Ray's logs.
    session = Path(two_node_cluster.head_node.get_session_dir_path())
    places = [tmp_path / "head.db", *artifacts.rglob("*"), *session.rglob("*")]
    recorded = b"".join(p.read_bytes() for p in places if p.is_file() and not p.is_symlink()) + text.encode()
    for name, secret in secrets.items():
        assert secret.encode() not in recorded, name
