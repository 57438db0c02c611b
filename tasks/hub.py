"""Hub snapshots: a dataset (or model) repository at a revision, as a local folder.

Every hub path of the tasks goes through `snapshot`, and so does `runner fetch`: what a cluster
fetched ahead (into the HF cache, or a folder) is exactly what a trial reads. With
`HF_HUB_OFFLINE=1`, huggingface_hub answers from the cache without touching the network.
"""

from __future__ import annotations

import logging
from pathlib import Path

from runner.errors import UserError

logger = logging.getLogger(__name__)


def snapshot(repo_id: str, revision: str, *, repo_type: str = "dataset", allow_patterns=None,
             local_dir: Path | None = None, note: str = "") -> Path:
    """The repository's files at `revision` (downloaded once into the HF cache, or into `local_dir`).

    A hub that cannot be reached, a missing repository or revision: one line, exit code 2.
    """
    import huggingface_hub
    from huggingface_hub import errors

    if revision == "main":
        logger.info("%s %s at the unpinned revision main; pin one with %s@<commit>", repo_type, repo_id, repo_id)
    try:
        path = huggingface_hub.snapshot_download(repo_id, repo_type=repo_type, revision=revision,
                                                 allow_patterns=list(allow_patterns) if allow_patterns else None,
                                                 local_dir=str(local_dir) if local_dir else None)
    except (errors.HfHubHTTPError, errors.LocalEntryNotFoundError, OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(
            f"cannot get {repo_type} {repo_id}@{revision} from the hub ({note + '; ' if note else ''}offline? "
            f"`runner fetch` it where there is network, or pass a local copy): {reason}") from error
    return Path(path)
