"""Held-out evaluation of a trial's checkpoint on the test split, on a Ray worker when connected.

Promotion and the stage comparison both score on test. On a cluster the sweep driver sits on a CPU
head, so the evaluation runs as a Ray task asking for the trial's own resources (a GPU worker);
the checkpoint and the processor travel as bytes through Ray, so MLflow stays on the head.
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
                    one_shot: bool = False, save_processor: bool = False):
    """Score a packed checkpoint (its adapter, or its bare base model) on the test split.

    Returns the Evaluation and, with save_processor, the packed processor for the registry.
    """
    from runner.evaluate import checkpoint_config, score_adapter

    with tempfile.TemporaryDirectory(prefix="runner-test-") as scratch:
        checkpoint = unpack(files, Path(scratch) / "checkpoint")
        processor_dir = Path(scratch) / "processor" if save_processor else None
        trial = checkpoint_config(checkpoint, {"max_eval_examples": test_max_examples})
        result = score_adapter(trial, checkpoint if with_adapter else None, "test", one_shot=one_shot,
                               save_processor=processor_dir)
        return result, pack(processor_dir) if processor_dir else {}


def evaluate_on_test(files: dict[str, bytes], test_max_examples: int | None,
                     resources: dict[str, float] | None, **options):
    """`evaluate_packed`, as a Ray task asking for `resources` when they include a GPU and Ray is
    connected (on a cluster that lands on a GPU worker); else in this process, which saves a worker's
    start-up and reuses the data this process already decoded."""
    import ray

    if resources is None or not resources.get("gpu") or not ray.is_initialized():
        return evaluate_packed(files, test_max_examples, **options)
    task = ray.remote(evaluate_packed).options(num_cpus=resources["cpu"], num_gpus=resources["gpu"])
    return ray.get(task.remote(files, test_max_examples, **options))
