"""Held-out evaluation of a trial's checkpoint on the test split, on a Ray GPU worker when connected.

Promotion scores the adapter on test and the stage comparison scores the bare base model zero- and
one-shot on the same questions: one `TestScorer` serves all three, so the base model and the test
images' features load once for the whole post-sweep phase. On a cluster the sweep driver sits on a
CPU head, so the scorer is a Ray actor asking for the trial's own resources (a GPU worker); the
checkpoint travels as bytes through Ray, so MLflow stays on the head.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)


def pack(directory: Path) -> dict[str, bytes]:
    return {str(path.relative_to(directory)): path.read_bytes() for path in directory.rglob("*") if path.is_file()}


def unpack(files: dict[str, bytes], directory: Path) -> Path:
    for name, data in files.items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(data)
    return directory


class PackedScorer:
    """A packed checkpoint, unpacked and loaded once (here, or as a Ray actor), scored as often as asked."""

    def __init__(self, files: dict[str, bytes], test_max_examples: int | None):
        from runner.eval.evaluate import SplitScorer
        from runner.train import checkpoint

        self.scratch = tempfile.TemporaryDirectory(prefix="runner-test-")
        self.folder = unpack(files, Path(self.scratch.name) / "checkpoint")
        self.scorer = SplitScorer(checkpoint.read_config(self.folder, {"max_eval_examples": test_max_examples}),
                                  "test", adapter=self.folder)

    def score(self, with_adapter: bool, one_shot: bool = False):
        return self.scorer.score(with_adapter=with_adapter, one_shot=one_shot)

    def placement(self) -> str:
        from runner.placement import placement

        return placement()


class TestScorer:
    """The test-split scorer of one trial's checkpoint, loaded on first use, once.

    `fetch` returns the checkpoint's local folder (downloaded from MLflow, on the driver). With a GPU
    in `resources` and Ray connected, the model loads in a Ray actor asking for them (on a cluster, a
    GPU worker); else in this process, which saves a worker's start-up. Use it as a context manager:
    leaving it frees the actor and its GPU share.
    """

    __test__ = False  # not a pytest class

    def __init__(self, fetch: Callable[[], Path], test_max_examples: int | None,
                 resources: dict[str, float] | None):
        self.fetch = fetch
        self.test_max_examples = test_max_examples
        self.resources = resources
        self._folder: Path | None = None
        self._scorer = None
        self.remote = False
        self.placement = ""  # where the scorer runs (host, Ray node, GPU), once it is loaded

    @property
    def folder(self) -> Path:
        if self._folder is None:
            self._folder = self.fetch()
        return self._folder

    def score(self, *, with_adapter: bool, one_shot: bool = False):
        """The checkpoint's adapter (or its bare base model) scored on test: an `Evaluation`."""
        import ray

        if self._scorer is None:
            files = pack(self.folder)
            self.remote = bool(self.resources and self.resources.get("gpu")) and ray.is_initialized()
            if self.remote:
                actor = ray.remote(PackedScorer).options(num_cpus=self.resources["cpu"],
                                                         num_gpus=self.resources["gpu"])
                self._scorer = actor.remote(files, self.test_max_examples)
            else:
                self._scorer = PackedScorer(files, self.test_max_examples)
            self.placement = ray.get(self._scorer.placement.remote()) if self.remote else self._scorer.placement()
            log.info("test scoring on %s", self.placement)
        if self.remote:
            return ray.get(self._scorer.score.remote(with_adapter, one_shot))
        return self._scorer.score(with_adapter, one_shot)

    def close(self) -> None:
        if self.remote and self._scorer is not None:
            import ray

            ray.kill(self._scorer)
        self._scorer = None

    def __enter__(self) -> TestScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
