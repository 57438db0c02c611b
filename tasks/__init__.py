"""Task registry: the names a config or the CLI may use, and how to build a task from them."""

from __future__ import annotations

import functools
import json
from typing import Any

from runner.errors import UserError
from tasks.base import Task
from tasks.easy_vqa import EasyVQA
from tasks.path_vqa import PathVQA
from tasks.slake import Slake
from tasks.vqa import VQA
from tasks.vqa_rad import VQARad

TASKS: dict[str, type[EasyVQA] | type[VQA]] = {
    task.name: task for task in (EasyVQA, VQARad, Slake, PathVQA, VQA)
}


def get_task(
    name: str,
    *,
    data: str | dict[str, Any] | None = None,
    skip_bad_images: bool = False,
    val_fraction: float = 0.1,
    seed: int = 0,
) -> Task:
    """Build the task called `name`; nothing is loaded until `load_split`.

    Cached: one process (a sweep driver scoring several stages) keys a split's images once.

    `data` is the task's data source (None: its default; a path or hub id; or a mapping with a
    column mapping and filters, see tasks/vqa.py), `val_fraction` and `seed` fix the validation
    carve, `skip_bad_images` drops (and counts) records whose image cannot be read instead of
    failing on the first one.
    """
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    # A mapping is not hashable: the cache sees it as canonical JSON.
    frozen = data if data is None or isinstance(data, str) else json.dumps(data, sort_keys=True)
    return _cached(name, frozen, not isinstance(data, (str, type(None))), skip_bad_images, val_fraction, seed)


@functools.lru_cache(maxsize=8)
def _cached(name: str, data: str | None, mapping: bool, skip_bad_images: bool, val_fraction: float,
            seed: int) -> Task:
    return TASKS[name](data=json.loads(data) if mapping else data, skip_bad_images=skip_bad_images,
                       val_fraction=val_fraction, seed=seed)
