"""Cluster mode on one machine: a real two-node Ray cluster (two raylets, each with one logical GPU),
a real `mlflow server` as the head's tracking server, and the CLI joining the cluster by address.

What cannot exist here: GPUs. The nodes declare logical GPUs (Ray schedules them like real ones and
sets CUDA_VISIBLE_DEVICES); the tiny model then trains on CPU in fp32. Trials ask for a whole GPU each,
so the two that run at once must land on different nodes; every trial's MLflow run says where it ran.
"""

from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.conftest import MODEL, SPACE, mlflow_server, run_cli


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


def test_sweep_spreads_over_nodes_tracks_to_a_server_and_promotes(two_node_cluster, tiny_model, tmp_path):
    shared = tmp_path / "shared"  # stands in for the cluster's shared storage (NFS / S3)
    with mlflow_server(f"sqlite:///{tmp_path / 'head.db'}", tmp_path / "head-artifacts") as server:
        result = run_cli(
            "tune", SPACE, "name=on-cluster", f"storage_path={shared}", f"tracking_uri={server}",
            "resources.gpu=1", "resources.cpu=1", "max_concurrent_trials=2", "num_samples=2",
            "trial.epochs=1", "space={n_samples: {choice: [200]}, learning_rate: {choice: [0.003]}}",
            "scheduler.type=none", "test_max_examples=60", "trial.max_eval_examples=60",
            "--address", two_node_cluster.address, cwd=tmp_path, env={"RAY_AUTH_MODE": "disabled"})
        assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-5000:])

        client = MlflowClient(server)
        experiment = client.get_experiment_by_name("quickstart")
        trials = client.search_runs([experiment.experiment_id], "tags.`runner.kind` = 'trial'")
        assert len(trials) == 2 and all(run.info.status == "FINISHED" for run in trials)
        placements = {run.data.tags["runner.placement"] for run in trials}
        nodes = {placement.split(" node ")[1].split()[0] for placement in placements}
        assert len(nodes) == 2, placements  # one trial on each node, each on its node's GPU 0
        assert all(placement.endswith("GPU 0") for placement in placements), placements

        # The adapters reached the server's artifact store (over HTTP, not a shared disk) and the
        # champion is registered there, loadable from its models:/ URI.
        assert any((tmp_path / "head-artifacts").rglob("adapter_model.safetensors"))
        champion = client.get_model_version_by_alias(MODEL, "champion")
        adapter = Path(client.download_artifacts(champion.run_id, "checkpoint/adapter"))
        assert (adapter / "adapter_config.json").exists()

    # Tune's experiment state and the driver's sweep state sit on the shared storage: `--resume` finds both.
    assert (shared / "on-cluster" / "runner_sweep.json").exists()
    assert any((shared / "on-cluster").glob("experiment_state-*.json"))
