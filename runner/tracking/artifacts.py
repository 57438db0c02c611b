"""Artifacts the driver and the CLI fetch: a trial's checkpoint from Ray's storage or from its MLflow run,
and an adapter to score from a path, `runs:/<trial run id>` or `models:/<name>@<alias>`."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from runner.config import check_tracking_uri
from runner.errors import UserError

CHECKPOINT_ARTIFACT = "checkpoint"  # where a trial run (and a registered model) keeps its best checkpoint


@contextmanager
def local_copy(path: str, storage: str) -> Iterator[Path]:
    """A checkpoint directory in Ray's storage, on local disk (Ray copies it only when storage is remote)."""
    from ray.train import Checkpoint

    filesystem = None
    if "://" in storage:
        import pyarrow.fs

        filesystem, _ = pyarrow.fs.FileSystem.from_uri(storage)
    with Checkpoint(path, filesystem=filesystem).as_directory() as local:
        yield Path(local)


def download_checkpoint(tracking_uri: str, run_id: str) -> Path:
    """The best epoch's checkpoint of a trial run, downloaded to a temporary directory."""
    from mlflow.artifacts import download_artifacts

    target = Path(tempfile.mkdtemp(prefix="runner-ckpt-"))
    return Path(download_artifacts(run_id=run_id, artifact_path=CHECKPOINT_ARTIFACT, dst_path=str(target),
                                   tracking_uri=tracking_uri))


def fetch_adapter(source: str, tracking_uri: str | None) -> Path:
    """An adapter to score, as a local directory: a path as given, `runs:/<trial run id>` (its best
    checkpoint) or `models:/<name>@<alias>` / `models:/<name>/<version>` (the checkpoint registered)."""
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from runner.tracking.client import default_tracking_uri, first_line, mlflow_globals

    if not source.startswith(("runs:/", "models:/")):
        if not Path(source).exists():
            raise UserError(f"--adapter: {source} does not exist")
        return Path(source)
    tracking_uri = tracking_uri or default_tracking_uri()
    check_tracking_uri(tracking_uri, "--tracking-uri")
    try:
        if source.startswith("runs:/"):
            return download_checkpoint(tracking_uri, source.removeprefix("runs:/").strip("/").split("/")[0])
        # models:/ resolves through the registry URI, not tracking_uri=, and reads the default tracking URI
        # too: unset, MLflow would create ./mlflow.db in the user's folder.
        with mlflow_globals(tracking_uri):
            model = Path(download_artifacts(artifact_uri=source, dst_path=tempfile.mkdtemp(prefix="runner-model-"),
                                            tracking_uri=tracking_uri))
    except MlflowException as error:
        raise UserError(f"--adapter: cannot fetch {source} from MLflow at {tracking_uri}: "
                        f"{first_line(error)}") from None
    checkpoint = next((path.parent for path in model.rglob("checkpoint.json")), None)
    if checkpoint is None:
        raise UserError(f"--adapter: {source} is not a model registered by runner (no checkpoint in it)")
    return checkpoint
