"""A full disk under the sweep's storage: the sweep stops with its state whole, and `--resume` continues.

Ray Tune rewrites its experiment state in place on the storage path and Ray Train copies each checkpoint
there; when the disk fills, the copy fails and the next state write leaves the file truncated (seen on an
8 MB tmpfs with Ray 2.60: `experiment_state-*.json` cut at 8,192 bytes), which no resume can read. So on a
local storage path the sweep holds RESERVE_BYTES of the disk in a file (`reserved_space`) and watches the
free space from Tune's loop (`StorageGuard`). Once the next checkpoints may not fit (or a copy that failed
has left the disk full), the guard releases the reserve, so that Tune's last state write and the MLflow
journal fit, and stops Tune the way Ctrl-C does (Tune's own SIGUSR1 handler): trials still running are
saved as running and `--resume` continues them from their last checkpoint. A Train worker whose checkpoint
did not fit waits for that stop instead of failing its trial (`wait_for_stop`, runner/sweep/trial.py).
An object store (`s3://`, `gs://`) has no disk to fill: no reserve, no guard.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import time
from pathlib import Path

from ray import tune

from runner.config import SweepConfig
from runner.errors import ServiceError, UserError

log = logging.getLogger(__name__)

RESERVE_BYTES = 16 * 2**20  # Tune's state, the searcher's and the journal of a 24-trial sweep are < 1 MB
FULL_BYTES = 2**20  # free space below this: a write has just failed, or the next one will
RESERVE_FILE = "reserved_space"
WAIT_FOR_STOP_S = 600  # how long a worker whose checkpoint did not fit waits for the driver to stop the sweep


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and (error.errno == errno.ENOSPC or "No space left on device" in str(error))


def reserve(config: SweepConfig) -> Path | None:
    """Hold RESERVE_BYTES of the storage disk in the sweep's folder (kept while the sweep runs, made again
    by `--resume`); None for an object store. A disk without that much free is refused before anything
    starts."""
    if "://" in config.storage:
        return None
    path = config.state_dir / RESERVE_FILE
    if path.exists() and path.stat().st_size == RESERVE_BYTES:
        return path
    created = not config.state_dir.exists()
    config.state_dir.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("wb") as handle:
            os.posix_fallocate(handle.fileno(), 0, RESERVE_BYTES)  # blocks taken now, not when written
    except OSError as error:
        path.unlink(missing_ok=True)
        if created:
            config.state_dir.rmdir()
        if not is_disk_full(error):
            raise
        free = shutil.disk_usage(config.state_dir.parent if created else config.state_dir).free
        raise UserError(f"storage_path: {config.storage} has {free >> 20} MB free; a sweep keeps "
                        f"{RESERVE_BYTES >> 20} MB there for its own state (a full disk stops it cleanly) — "
                        "free space or choose another storage_path") from None
    return path


def full_message(config: SweepConfig, command: str) -> str:
    free = shutil.disk_usage(config.state_dir).free
    resume = command if command.endswith("--resume") else f"{command} --resume"
    return (f"storage_path: no space left on device in {config.storage} ({free >> 20} MB free now, with the "
            f"{RESERVE_BYTES >> 20} MB the sweep kept in reserve released); the sweep stopped with its state "
            f"saved and every finished trial intact. Free space there, then run `{resume}`")


class StorageGuard(tune.Callback):
    """Watches the storage disk from Tune's loop (at most once a second). When less is free than two of the
    sweep's largest checkpoints (at least FULL_BYTES), the next checkpoint may not fit: it releases the
    reserve and stops the sweep as Ctrl-C does. The released reserve tells the driver afterwards
    (`check_not_stopped`: on `--resume` Tune runs the guard it restored from its own state, not ours)."""

    def __init__(self, reserve_file: Path):
        self.reserve_file = reserve_file
        self.largest_checkpoint = 0
        self._checked = 0.0

    def on_trial_result(self, iteration, trials, trial, result, **info):
        folder = Path(str(result.get("checkpoint_path", "")))
        if "://" not in str(folder) and folder.is_dir():
            size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
            self.largest_checkpoint = max(self.largest_checkpoint, size)

    def on_step_begin(self, iteration, trials, **info):
        now = time.monotonic()
        if now - self._checked < 1.0 or not self.reserve_file.exists():
            return
        self._checked = now
        free, needed = shutil.disk_usage(self.reserve_file.parent).free, max(FULL_BYTES, 2 * self.largest_checkpoint)
        if free < needed:
            self.reserve_file.unlink()
            log.error("storage_path: %d KB free on the disk of %s, less than the next checkpoints need (%d KB): "
                      "released the %d MB reserve and stopping the sweep, its state saved", free >> 10,
                      self.reserve_file.parent.parent, needed >> 10, RESERVE_BYTES >> 20)
            os.kill(os.getpid(), signal.SIGUSR1)  # Tune's stop signal: last state write, trials resumable


def check_not_stopped(config: SweepConfig, reserve_file: Path | None, command: str) -> None:
    """After Tune's run: a released reserve means the guard stopped the sweep on a full disk."""
    if reserve_file is not None and not reserve_file.exists():
        raise ServiceError(full_message(config, command))


def wait_for_stop(storage: str, epoch: int, error: OSError) -> None:
    """In a Train worker whose checkpoint did not fit: say so, and wait for the driver's guard to stop the
    sweep (this trial is then resumed from its last checkpoint, not failed); after WAIT_FOR_STOP_S (no
    guard: an object store, or a driver gone), fail the trial with the error."""
    log.warning("epoch %d's checkpoint did not fit in storage_path %s (%s): waiting for the sweep to stop; "
                "free space there and resume it", epoch, storage, error)
    time.sleep(WAIT_FOR_STOP_S)
    raise error
