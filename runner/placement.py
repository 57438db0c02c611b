"""Where this process runs: host, Ray node and GPU ids. Recorded for every trial's worker and for the test
scoring, so a cluster's MLflow runs say which node trained and which scored (a GPU worker, not the head)."""

from __future__ import annotations

import socket


def placement() -> str:
    """`<host> node <Ray node id, 12 chars> GPU <ids or none>`; without Ray, `<host> node none GPU none`."""
    import ray

    if not ray.is_initialized():
        return f"{socket.gethostname()} node none GPU none"
    node = ray.get_runtime_context().get_node_id()
    gpus = ",".join(str(gpu) for gpu in ray.get_gpu_ids()) or "none"
    return f"{socket.gethostname()} node {node[:12]} GPU {gpus}"
