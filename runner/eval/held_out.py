"""Held-out evaluation of a trial's checkpoint on the test split, on a Ray worker when connected.

Promotion and the stage comparison both score on test. On a cluster the sweep driver sits on a CPU
head, so the evaluation runs as a Ray task asking for the trial's own resources (a GPU worker); the
checkpoint travels as bytes through Ray, so MLflow stays on the head.
"""

from __future__ import annotations

import tempfile
from pathlib import Path


def pack(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def unpack(files: dict[str, bytes], directory: Path) -> Path:
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return directory


def evaluate_packed(files: dict[str, bytes], test_max_examples: int | None, *, with_adapter: bool,
                    one_shot: bool = False):
    """Score a packed checkpoint (its adapter, or its bare base model) on the test split."""
    from runner.eval.evaluate import score_adapter
    from runner.train import checkpoint

    with tempfile.TemporaryDirectory(prefix="runner-test-") as scratch:
        folder = unpack(files, Path(scratch) / "checkpoint")
        trial = checkpoint.read_config(folder, {"max_eval_examples": test_max_examples})
        return score_adapter(trial, folder if with_adapter else None, "test", one_shot=one_shot)


def evaluate_on_test(checkpoint_dir: Path, test_max_examples: int | None,
                     resources: dict[str, float] | None, **options):
    """`evaluate_packed`, as a Ray task asking for `resources` when they include a GPU and Ray is
    connected (on a cluster that lands on a GPU worker); else in this process, which saves a worker's
    start-up and reuses the data this process already decoded."""
    import ray

    files = pack(checkpoint_dir)
    if resources is None or not resources.get("gpu") or not ray.is_initialized():
        return evaluate_packed(files, test_max_examples, **options)
    task = ray.remote(evaluate_packed).options(num_cpus=resources["cpu"], num_gpus=resources["gpu"])
    return ray.get(task.remote(files, test_max_examples, **options))
