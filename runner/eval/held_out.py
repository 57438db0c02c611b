"""Held-out evaluation of a trial's checkpoint on the test split, on a Ray GPU worker when connected.

Promotion scores the adapter on test and the stage comparison scores the bare base model zero- and
one-shot on the same questions: one `TestScorer` serves all three, so the base model and the test
images' features load once for the whole post-sweep phase — or, in a sweep on GPUs, before it ends
(`WarmScorer`: in a GPU share the last trials no longer need). On a cluster the sweep driver sits on a
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
    """The test split's scorer, loaded once (here, or as a Ray actor) and scored as often as asked: the base
    model of `trial` (a TrialConfig as a dict) and the test images' features, with an adapter from a packed
    checkpoint (`files`, now or later by `add_adapter`). The bare model's scores are kept: an adapter put
    on later leaves them as they were (`disable_adapter`)."""

    def __init__(self, trial: dict, files: dict[str, bytes] | None = None):
        from runner.config import TrialConfig
        from runner.eval.evaluate import SplitScorer

        self.scratch = tempfile.TemporaryDirectory(prefix="runner-test-")
        folder = unpack(files, Path(self.scratch.name) / "checkpoint") if files else None
        self.scorer = SplitScorer(TrialConfig(**trial), "test", adapter=folder)
        self.bare: dict[bool, object] = {}  # one_shot -> Evaluation

    def add_adapter(self, files: dict[str, bytes]) -> None:
        self.scorer.add_adapter(unpack(files, Path(self.scratch.name) / "checkpoint"))

    def score(self, with_adapter: bool, one_shot: bool = False):
        if with_adapter:
            return self.scorer.score(with_adapter=True, one_shot=one_shot)
        if one_shot not in self.bare:
            self.bare[one_shot] = self.scorer.score(with_adapter=False, one_shot=one_shot)
        return self.bare[one_shot]

    def placement(self) -> str:
        from runner.placement import placement

        return placement()


def scoring_config(folder: Path | None, trial: dict | None, test_max_examples: int | None):
    """The TrialConfig test scoring uses: the checkpoint's (or `trial`'s), scoring `test_max_examples`."""
    from runner.config import TrialConfig
    from runner.train import checkpoint

    override = {"max_eval_examples": test_max_examples}
    return checkpoint.read_config(folder, override) if folder is not None else TrialConfig(**{**trial, **override})


def same_scores(a, b) -> bool:
    """Whether two trial configs give the same bare-model test scores (and take the same image features)."""
    from runner.config import SCORING_FIELDS

    return all(getattr(a, key) == getattr(b, key) for key in SCORING_FIELDS) and a.trains_qformer == b.trains_qformer


class WarmScorer:
    """The test scorer of a sweep's base model, loaded while the sweep's last trials still train.

    Once every trial has started and one has ended, its freed GPU share would sit idle until the sweep
    ends: the scorer takes it (runner/sweep/tail.py), loads the base model and the test images' features
    and scores the zero- and one-shot stages there, so the post-sweep phase adds only the champion's
    adapter and its score. It gives the share back at once (`release`) when a trial needs it (a worker
    restarted after its node was lost), and is used only if the champion's config scores like `trial`.
    """

    def __init__(self, trial: dict, test_max_examples: int | None, resources: dict[str, float]):
        self.config = scoring_config(None, trial, test_max_examples)
        self.resources = resources
        self.actor = None
        self.stages: list = []  # the zero- and one-shot scores' object refs, while they run
        self.placement = ""

    def start(self) -> None:
        import ray

        actor = ray.remote(PackedScorer).options(num_cpus=self.resources["cpu"], num_gpus=self.resources["gpu"])
        self.actor = actor.remote(self.config.to_dict())
        # Queued behind the load; the actor keeps their results for the stage runs.
        self.stages = [self.actor.score.remote(False, one_shot) for one_shot in (False, True)]
        log.info("test scorer: loading the base model and the test split in a freed GPU share, scoring the "
                 "zero- and one-shot stages while the last trials train")

    def release(self, why: str) -> None:
        import ray

        if self.actor is not None:
            ray.kill(self.actor)
            self.actor, self.stages = None, []
            log.info("test scorer: freed its GPU share (%s)", why)

    def adopt(self, config, files: dict[str, bytes]):
        """The actor, with the champion's adapter added, if it scores like `config`; else None (released)."""
        import ray

        if self.actor is None:
            return None
        if not same_scores(config, self.config):
            self.release("the champion's settings score the test split differently; loading it for them")
            return None
        try:
            ray.get(self.actor.add_adapter.remote(files))
            self.placement = ray.get(self.actor.placement.remote())
        except ray.exceptions.RayError as error:  # loaded again below; a real fault fails there, in the open
            log.warning("test scorer: the one loaded during the sweep failed (%s); loading it again",
                        str(error).splitlines()[0])
            self.release("it failed")
            return None
        actor, self.actor = self.actor, None  # the TestScorer frees it from here on
        return actor


class TestScorer:
    """The test-split scorer of one trial's checkpoint, loaded on first use, once.

    `fetch` returns the checkpoint's local folder (downloaded from MLflow, on the driver). With a GPU
    in `resources` and Ray connected, the model loads in a Ray actor asking for them (on a cluster, a
    GPU worker) — or is the sweep's `warm` one, already loaded; else in this process, which saves a
    worker's start-up. Use it as a context manager: leaving it frees the actor and its GPU share.
    """

    __test__ = False  # not a pytest class

    def __init__(self, fetch: Callable[[], Path], test_max_examples: int | None,
                 resources: dict[str, float] | None, warm: WarmScorer | None = None):
        self.fetch = fetch
        self.test_max_examples = test_max_examples
        self.resources = resources
        self.warm = warm
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
            self.load()
        if self.remote:
            return ray.get(self._scorer.score.remote(with_adapter, one_shot))
        return self._scorer.score(with_adapter, one_shot)

    def load(self) -> None:
        import ray

        files = pack(self.folder)
        config = scoring_config(self.folder, None, self.test_max_examples)
        self.remote = bool(self.resources and self.resources.get("gpu")) and ray.is_initialized()
        if self.warm is not None and (actor := self.warm.adopt(config, files)) is not None:
            self._scorer, self.placement, self.remote = actor, self.warm.placement, True
            log.info("test scoring on %s (loaded during the sweep)", self.placement)
            return
        if self.remote:
            actor = ray.remote(PackedScorer).options(num_cpus=self.resources["cpu"], num_gpus=self.resources["gpu"])
            self._scorer = actor.remote(config.to_dict(), files)
            self.placement = ray.get(self._scorer.placement.remote())
        else:
            self._scorer = PackedScorer(config.to_dict(), files)
            self.placement = self._scorer.placement()
        log.info("test scoring on %s", self.placement)

    def close(self) -> None:
        if self.remote and self._scorer is not None:
            import ray

            ray.kill(self._scorer)
        self._scorer = None
        if self.warm is not None:
            self.warm.release("post-sweep scoring ended")

    def __enter__(self) -> TestScorer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
