"""One trial of the sweep: the Tune trial function and the Ray Train worker it starts. Imports no MLflow.

Ray 2.60 runs Train V2, which no longer accepts a `TorchTrainer` inside a `Tuner`; the supported shape
(and ours) is a small Tune trial function (`run_trial`, 0.1 CPU, no GPU) that builds and fits a
one-worker `TorchTrainer`; `TuneReportCallback` forwards the worker's per-epoch reports to Tune, so
ASHA can stop a trial between epochs.

A crash of the worker (a killed process, a lost node) is retried from the last checkpoint up to
`max_failures` times. A trial that fails by its own settings — its loss diverges, it runs out of GPU
memory, its input is bad — would fail the same way again, so the worker reports the reason instead of
raising and the trial function fails the trial at once, without a retry.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from ray import train, tune

from runner.config import TrialConfig, build

PLACEMENT_KEY = "placement"  # the worker's report key for where it ran (host, Ray node, GPU)
FATAL_KEY = "fatal_error"  # the worker's report key for a failure that a retry would repeat
FATAL_FILE = "FATAL"  # the marker checkpoint it comes with: Ray Train's Result keeps checkpointed reports only
DRIVER_CPU = 0.1  # the Tune trial function only waits on its TorchTrainer (0 CPU is rejected by Tune)
# ... and runs on the head node, with its Train controller (which Ray Train puts beside it): a GPU worker
# node that dies takes only the trial's Train worker, which Ray Train restarts elsewhere from the last
# checkpoint; a trial function on it would fail the trial for good (tests/test_node_loss.py). Ray's own
# Train state actor is pinned the same way.
HEAD_RESOURCE = "node:__internal_head__"  # Ray gives it (1.0) to the head node only
TRIAL_FUNCTION_RESOURCES = {"cpu": DRIVER_CPU, HEAD_RESOURCE: 0.001}


class TrialFailed(RuntimeError):
    """The trial's own settings made it fail (reason from its worker); not retried."""


def run_trial(sampled: dict[str, Any], *, base: dict[str, Any], gpu: float, cpu: float, max_failures: int,
              storage_path: str, sweep: str) -> None:
    """Tune trial function: fit a one-worker TorchTrainer on this trial's config."""
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from runner import console

    started_at = time.time()
    config = build(TrialConfig, {**base, **sampled}, "trial")
    if ended_before(tune.get_checkpoint(), config.epochs):
        return
    trial_id = tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_loop_per_worker=worker_loop,
        train_loop_config={"trial": config.to_dict(), "threads": max(1, round(cpu)), "gpu_share": gpu or 1.0,
                           "storage_path": storage_path, "started_at": started_at},
        # One worker never communicates: gloo sets up without a CUDA device (the logical GPUs of a
        # simulated cluster) and leaves a shared card free of NCCL's communicator.
        torch_config=TorchConfig(backend="gloo"),
        scaling_config=train.ScalingConfig(num_workers=1, use_gpu=gpu > 0,
                                           resources_per_worker={"CPU": cpu, **({"GPU": gpu} if gpu else {})}),
        run_config=train.RunConfig(
            name=f"{sweep}-{trial_id}",  # deterministic: a restored sweep resumes this Train run
            storage_path=storage_path,
            callbacks=[TuneReportCallback()],
            failure_config=train.FailureConfig(max_failures=max_failures, controller_failure_limit=2),
            # Ray Train's INFO lines (worker group start, every checkpoint and report) stay in its log files.
            logging_config=train.LoggingConfig(log_level="INFO" if console.is_verbose() else "WARNING"),
        ),
    )
    result = trainer.fit()
    if (result.metrics or {}).get(FATAL_KEY):
        raise TrialFailed(result.metrics[FATAL_KEY])


def ended_before(taken: train.Checkpoint | None, epochs: int) -> bool:
    """A restored trial that had ended before the sweep stopped, by the last checkpoint Tune took in from it
    (the sweep's state lags its trials' ends: a driver killed or stopped in between): a failure for good is
    raised again, a last epoch reported again (MLflow logs each epoch once) — without starting Ray Train."""
    from runner.train import checkpoint

    if taken is None:
        return False
    with taken.as_directory() as folder:
        if (Path(folder) / FATAL_FILE).exists():
            raise TrialFailed((Path(folder) / FATAL_FILE).read_text())
        saved = checkpoint.load(Path(folder))
        if saved.epoch < epochs:
            return False
        tune.report(saved.history[-1], checkpoint=taken)
    return True


def worker_loop(loop_config: dict[str, Any]) -> None:
    """What the Ray Train worker runs: `train_trial`, resuming from Ray's latest checkpoint if any."""
    from runner import console

    console.quiet_train_worker()  # before the imports below: bitsandbytes speaks when imported
    import torch

    from runner import exiting
    from runner.errors import UserError
    from runner.placement import placement as where
    from runner.sweep.storage import is_disk_full, wait_for_stop
    from runner.train import checkpoint
    from runner.train.loop import TrialDiverged, TrialOutOfMemory, train_trial

    torch.set_num_threads(loop_config["threads"])  # unpinned threads thrash a shared CPU
    exiting.stop_loops_at_exit()  # Ray runs this in a daemon thread: a stopped trial must not abort at exit
    config = TrialConfig(**loop_config["trial"])
    latest = train.get_checkpoint()
    placement = where()

    def report(metrics: dict[str, float], checkpoint_dir: Path) -> None:
        try:
            train.report({**metrics, PLACEMENT_KEY: placement},
                         checkpoint=train.Checkpoint.from_directory(str(checkpoint_dir)))
        except OSError as error:  # the checkpoint's copy to storage; a full disk stops the sweep, not the trial
            if not is_disk_full(error):
                raise
            wait_for_stop(loop_config["storage_path"], int(metrics["epoch"]), error)

    with tempfile.TemporaryDirectory(prefix="trial-") as output:
        resume = Path(latest.to_directory()) if latest is not None else None
        if resume is not None and (resume / FATAL_FILE).exists():  # failed for good before a restart
            return report_fatal(Path(output), (resume / FATAL_FILE).read_text())
        try:
            if resume is not None and (saved := checkpoint.load(resume)).epoch >= config.epochs:
                # Its Train run ended, but Tune had not taken the last epoch in when the sweep stopped (a
                # full disk, a killed driver; cf. `ended_before`): report it once more.
                return report(saved.history[-1], resume)
            train_trial(config, Path(output), report=report, resume_from=resume,
                        gpu_share=min(1.0, loop_config["gpu_share"]), started_at=loop_config.get("started_at"))
        except (TrialDiverged, TrialOutOfMemory, UserError) as error:
            report_fatal(Path(output), f"{type(error).__name__}: {error}")


def report_fatal(output: Path, reason: str) -> None:
    marker = output / "fatal"
    marker.mkdir()
    (marker / FATAL_FILE).write_text(reason)
    train.report({FATAL_KEY: reason}, checkpoint=train.Checkpoint.from_directory(str(marker)))
