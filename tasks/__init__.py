"""Task registry: the names a config or the CLI may use, and how to build a task from them."""

from __future__ import annotations

import functools

from runner.errors import UserError
from tasks.base import Task
from tasks.easy_vqa import EasyVQA
from tasks.vqa_rad import VQARad

TASKS: dict[str, type[EasyVQA] | type[VQARad]] = {
    EasyVQA.name: EasyVQA,
    VQARad.name: VQARad,
}


@functools.lru_cache(maxsize=8)
def get_task(
    name: str,
    *,
    data: str | None = None,
    skip_bad_images: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Task:
    """Build the task called `name`; nothing is loaded until `load_split`.

    Cached: one process (a sweep driver scoring several stages) decodes a split's images once.

    `data` is the task's data source (None: its default), `val_fraction` and `seed` fix the
    validation carve, `skip_bad_images` drops (and counts) records whose image cannot be read
    instead of failing on the first one.
    """
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name](
        data=data, skip_bad_images=skip_bad_images, val_fraction=val_fraction, seed=seed
    )
