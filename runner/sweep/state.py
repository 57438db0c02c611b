"""The sweep driver's own small files, in one place: the sweep state (MLflow run id, tracking URI, the
config it ran with) and the MLflow journals, all under `SweepConfig.state_dir`."""

from __future__ import annotations

import json
from pathlib import Path

from runner.config import SweepConfig
from runner.errors import UserError


def state_file(config: SweepConfig) -> Path:
    return config.state_dir / "runner_sweep.json"


def journal_file(config: SweepConfig) -> Path:
    """MLflow updates that could not be written yet (MLflow unreachable)."""
    return config.state_dir / "mlflow_pending.jsonl"


def failed_file(config: SweepConfig) -> Path:
    """MLflow updates refused for good, each with its reason."""
    return config.state_dir / "mlflow_failed.jsonl"


def log_file(config: SweepConfig) -> Path:
    """The sweep driver's full log (every record, whatever the console showed), appended by each command."""
    return config.state_dir / "runner.log"


def exists(config: SweepConfig) -> bool:
    return state_file(config).exists()


def read(config: SweepConfig) -> dict:
    """The saved state of the sweep named in `config`; a clear error when there is none."""
    path = state_file(config)
    if not path.exists():
        raise UserError(f"name: no sweep named {config.name!r} in {config.state_dir.parent}")
    return json.loads(path.read_text())


def write(config: SweepConfig, state: dict) -> None:
    path = state_file(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(state, indent=2))
    temporary.replace(path)
