"""`runner fetch`: a task's dataset or a BLIP-2 checkpoint, at a pinned commit, for a cluster without internet.

Where there is network: `runner fetch slake` (into the HF cache, which `HF_HUB_OFFLINE=1` runs then read)
or `runner fetch slake --to /shared/slake` (a folder to pass as `trial.data`). The revision asked for is
resolved to its commit first, the files of that commit are downloaded (a dataset's `hub_files` only: SLAKE's
JSON and imgs.zip, not its knowledge graph), and `FETCHED.json` records the repository, the commit and every
file's sha256. `--from MIRROR` copies from a folder in the hub's layout instead (a disk carried into the air
gap): the same files, the same record. Without network the first call fails at once, in one line.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from runner.errors import UserError

MANIFEST = "FETCHED.json"
# A BLIP-2 checkpoint ships both .bin and .safetensors weights: one set is enough.
MODEL_FILES = ("*.json", "*.safetensors", "*.model", "*.txt", "*.md")


@dataclass(frozen=True)
class Target:
    """What to fetch: a hub repository, its type, the revision asked for and the files wanted."""

    repo_id: str
    repo_type: str  # "dataset" or "model"
    revision: str
    patterns: tuple[str, ...] | None


def target(name: str, revision: str | None) -> Target:
    """A task name (its hub dataset) or a model's hub id."""
    from runner.tiny import TINY_MODEL
    from tasks import TASKS

    if name in TASKS:
        task = TASKS[name]
        if getattr(task, "hub_id", None) is None:
            raise UserError(f"task {name} has no hub dataset to fetch (it reads local data or a package)")
        return Target(task.hub_id, "dataset", revision or task.hub_revision, task.hub_files)
    if name == TINY_MODEL:
        raise UserError(f"{TINY_MODEL!r} ships with this package: nothing to fetch")
    if "/" not in name:
        raise UserError(f"{name!r} is neither a task ({', '.join(sorted(TASKS))}) nor a model hub id (owner/name)")
    return Target(name, "model", revision or "main", MODEL_FILES)


def fetch(name: str, *, to: Path | None, revision: str | None, mirror: Path | None) -> tuple[Path, dict]:
    """Download (or copy from `mirror`) `name` into `to` (None: the HF cache); write and return the record."""
    wanted = target(name, revision)
    if mirror is not None:
        if to is None:
            raise UserError("--from needs --to: a mirror is copied into a folder")
        folder, commit = copy_mirror(mirror, to, wanted.patterns), f"from {mirror.resolve()}"
    else:
        folder, commit = download(wanted, to)
    files = {str(path.relative_to(folder)): sha256(path) for path in sorted(folder.rglob("*"))
             if path.is_file() and path.name != MANIFEST and ".cache" not in path.relative_to(folder).parts}
    if not files:
        raise UserError(f"{wanted.repo_id}: no files matched {', '.join(wanted.patterns or ('*',))}")
    record = {"repo_id": wanted.repo_id, "repo_type": wanted.repo_type, "revision": wanted.revision,
              "commit": commit, "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "sha256": files}
    # In the HF cache the snapshot folder is huggingface_hub's own: the record goes next to it.
    place = folder if to is not None else folder.parent.parent
    (place / MANIFEST).write_text(json.dumps(record, indent=2) + "\n")
    return folder, record


def download(wanted: Target, to: Path | None) -> tuple[Path, str]:
    """Resolve the revision to a commit (one call: fails at once without network), then fetch that commit."""
    import httpx2  # huggingface_hub's HTTP client: its transport errors are "no network"
    import huggingface_hub
    from huggingface_hub import errors

    from tasks.hub import snapshot

    try:
        info = huggingface_hub.HfApi().repo_info(wanted.repo_id, repo_type=wanted.repo_type,
                                                 revision=wanted.revision)
    except (httpx2.TransportError, errors.HfHubHTTPError, errors.OfflineModeIsEnabled, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"cannot reach the hub for {wanted.repo_type} {wanted.repo_id}@{wanted.revision} "
                        f"(run `runner fetch` where there is network, or copy a mirror with --from): {reason}") from error
    if to is None:
        # By the revision's name, so the cache maps it (refs/<revision>) for offline runs that ask for it.
        folder = snapshot(wanted.repo_id, wanted.revision, repo_type=wanted.repo_type, allow_patterns=wanted.patterns)
        return folder, folder.name  # snapshots/<commit>
    folder = snapshot(wanted.repo_id, info.sha, repo_type=wanted.repo_type, allow_patterns=wanted.patterns,
                      local_dir=to)
    return folder, info.sha


def copy_mirror(mirror: Path, to: Path, patterns: tuple[str, ...] | None) -> Path:
    """The files of `mirror` matching `patterns` (paths relative to it), copied into `to`."""
    if not mirror.is_dir():
        raise UserError(f"--from {mirror}: not a folder")
    chosen = [path for path in sorted(mirror.rglob("*")) if path.is_file()
              and (patterns is None or any(fnmatch.fnmatch(str(path.relative_to(mirror)), p) for p in patterns))]
    if not chosen:
        raise UserError(f"--from {mirror}: no file matches {', '.join(patterns or ('*',))}")
    for path in chosen:
        target_path = to / path.relative_to(mirror)
        target_path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target_path)
    return to


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
