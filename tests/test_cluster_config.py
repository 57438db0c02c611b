"""cluster.yaml is a valid Ray cluster-launcher config (Ray's own preparation + schema validation,
offline: no cloud is contacted), and the cluster search space points at the head's MLflow server."""

import copy

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from runner.config import load_sweep
from tests.conftest import REPO


def test_cluster_yaml_passes_rays_validation():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    gpu_types = [name for name, node in config["available_node_types"].items() if name != config["head_node_type"]]
    assert gpu_types and all(config["available_node_types"][t]["max_workers"] >= 1 for t in gpu_types)
    start = " ".join(config["head_start_ray_commands"])
    assert "mlflow server" in start and "--host 127.0.0.1" in start  # tracking stays on the head


def test_a_broken_cluster_yaml_is_rejected():
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["available_node_types"]["head"]["resources"] = "four"
    with pytest.raises(Exception):
        validate_config(prepare_config(config))


def test_cluster_space_tracks_to_a_server_and_shared_storage():
    config = load_sweep(REPO / "search_spaces" / "cluster.yaml")
    assert config.tracking_uri.startswith("http://") and "://" in config.storage_path
    assert config.resources.gpu > 0 and config.trial.precision == "int8"
