"""The sweep: Ray Tune over the search space; each trial a Ray Train worker running `train_trial`.

Ray 2.60 runs Train V2, which no longer accepts a `TorchTrainer` inside a `Tuner`; the supported shape
(and ours) is a small Tune trial function (`run_trial`, 0.1 CPU, no GPU) that builds and fits a
one-worker `TorchTrainer`; `TuneReportCallback` forwards the worker's per-epoch reports to Tune, so
ASHA can stop a trial between epochs. MLflow logging hangs off the Tune driver (runner/tracking.py).
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import train, tune

from runner.config import SweepConfig, TrialConfig, build
from runner.errors import UserError
from runner.tracking import PLACEMENT_KEY

log = logging.getLogger(__name__)

DRIVER_CPU = 0.1  # the Tune trial function only waits on its TorchTrainer (0 CPU is rejected by Tune)


@dataclass
class SweepOutcome:
    sweep_run_id: str
    results: Any  # ray.tune.ResultGrid
    path: str


def connect(address: str | None) -> dict[str, float]:
    """Start a local Ray cluster (address None) or join one; return its resources."""
    if address is None:
        # A throwaway local cluster needs no token; a real cluster keeps Ray's token auth.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # A resumed trial whose Train run had already finished returns without reporting again; Tune's
    # strict check would turn that into an error for the whole sweep.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    if address not in (None, "auto") and not address.startswith("ray://"):
        check_reachable(address)
    if not ray.is_initialized():
        try:
            ray.init(address=address, dashboard_host="127.0.0.1", logging_level=logging.WARNING,
                     log_to_driver=True, include_dashboard=None)
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise UserError(f"--address {address}: cannot connect to a Ray cluster: {error}") from error
    return ray.cluster_resources()


def check_reachable(address: str) -> None:
    """Fail in seconds, not after Ray's minutes of retries, when nothing listens at host:port."""
    import socket

    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise UserError(f"--address {address}: expected host:port, auto, or ray://host:port")
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise UserError(f"--address {address}: no Ray cluster answers there ({error})") from error


def concurrency(config: SweepConfig, resources: dict[str, float]) -> int:
    """How many trials fit at once: by GPU share, and by CPU (worker share + the trial driver's)."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    need = config.resources
    if need.gpu > 0 and gpus < need.gpu:
        raise UserError(f"resources.gpu: {need.gpu} GPU per trial requested but the cluster has {gpus:g} GPUs")
    if cpus < need.cpu + DRIVER_CPU:
        raise UserError(f"resources.cpu: {need.cpu} CPU per trial (+{DRIVER_CPU} for its driver) requested "
                        f"but the cluster has {cpus:g} CPUs")
    fit = math.floor(cpus / (need.cpu + DRIVER_CPU) + 1e-9)
    if need.gpu > 0:
        fit = min(fit, math.floor(gpus / need.gpu + 1e-9))
    if config.max_concurrent_trials is not None:
        fit = min(fit, config.max_concurrent_trials)
    return max(1, fit)


def tune_domain(domain: dict[str, Any]):
    kind, values = next(iter(domain.items()))
    if kind == "grid":
        return tune.grid_search(values)
    if kind == "choice":
        return tune.choice(values)
    return getattr(tune, kind)(*values)


def run_trial(sampled: dict[str, Any], *, base: dict[str, Any], gpu: float, cpu: float, max_failures: int,
              storage_path: str, sweep: str) -> None:
    """Tune trial function: fit a one-worker TorchTrainer on this trial's config."""
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    config = build(TrialConfig, {**base, **sampled}, "trial")
    trial_id = tune.get_context().get_trial_id()
    trainer = TorchTrainer(
        train_loop_per_worker=worker_loop,
        train_loop_config={"trial": config.to_dict(), "threads": max(1, round(cpu))},
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
        ),
    )
    trainer.fit()


def worker_loop(loop_config: dict[str, Any]) -> None:
    """What the Ray Train worker runs: `train_trial`, resuming from Ray's latest checkpoint if any."""
    import tempfile

    import torch

    from runner.train import train_trial

    torch.set_num_threads(loop_config["threads"])  # unpinned threads thrash a shared CPU
    config = TrialConfig(**loop_config["trial"])
    checkpoint = train.get_checkpoint()
    resume = None
    if checkpoint is not None:
        resume = Path(checkpoint.to_directory())

    placement = worker_placement()

    def report(metrics: dict[str, float], checkpoint_dir: Path) -> None:
        train.report({**metrics, PLACEMENT_KEY: placement},
                     checkpoint=train.Checkpoint.from_directory(str(checkpoint_dir)))

    with tempfile.TemporaryDirectory(prefix="trial-") as output:
        train_trial(config, Path(output), report=report, resume_from=resume)


def worker_placement() -> str:
    """Host, Ray node and GPU ids of this Train worker: which node ran which trial, on a cluster."""
    import socket

    node = ray.get_runtime_context().get_node_id()
    gpus = ",".join(str(gpu) for gpu in ray.get_gpu_ids()) or "none"
    return f"{socket.gethostname()} node {node[:12]} GPU {gpus}"


def make_scheduler(config: SweepConfig):
    if config.scheduler.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=config.trial.epochs, grace_period=config.scheduler.grace_period,
                         reduction_factor=config.scheduler.reduction_factor)


def build_tuner(config: SweepConfig, storage_path: str, callbacks: list, max_concurrent: int,
                restore: bool) -> tune.Tuner:
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=config.trial.to_dict(), gpu=config.resources.gpu,
                             cpu=config.resources.cpu, max_failures=config.max_failures,
                             storage_path=storage_path, sweep=config.name),
        {"cpu": DRIVER_CPU},
    )
    param_space = {key: tune_domain(domain) for key, domain in config.space.items()}
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if restore:
        return tune.Tuner.restore(f"{storage_path.rstrip('/')}/{config.name}", trainable=trainable,  # a URI too
                                  param_space=param_space, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable,
        param_space=param_space,
        tune_config=tune.TuneConfig(
            metric=config.metric, mode=config.mode, scheduler=make_scheduler(config),
            num_samples=config.num_samples,
            # Seeded sampling: the same space file draws the same trials. A search_alg of our own must
            # carry the concurrency limit itself (TuneConfig's only reaches the default one).
            search_alg=BasicVariantGenerator(random_state=config.trial.seed, max_concurrent=max_concurrent)),
        run_config=tune.RunConfig(name=config.name, storage_path=storage_path, callbacks=callbacks,
                                  verbose=1, failure_config=tune.FailureConfig(max_failures=0)),
    )


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\- ]{0,254}$")


def check_inputs(config: SweepConfig) -> None:
    """What would otherwise fail inside every trial, checked once on the driver: the data loads, every
    n_samples the space can draw fits the train split, the model directory exists, int8 has a GPU."""
    from runner.model import TINY_MODEL, resolve_model
    from tasks import get_task

    if not MODEL_NAME.match(config.registered_model):
        raise UserError(f"registered_model: {config.registered_model!r} is not a valid MLflow model name "
                        "(letters, digits, '.', '_', '-', spaces)")
    trial = config.trial
    if trial.precision in ("int8", "nf4") and config.resources.gpu == 0:
        raise UserError(f"trial.precision: {trial.precision} needs a GPU per trial (resources.gpu > 0); "
                        "on CPU use fp32 or bf16")
    if "/" in trial.model and (trial.model.startswith((".", "/")) or Path(trial.model).exists()):
        if not (Path(trial.model) / "config.json").exists():
            raise UserError(f"trial.model: {trial.model} is not a saved BLIP-2 directory (no config.json)")
    elif trial.model != TINY_MODEL and "/" not in trial.model:
        raise UserError(f"trial.model: {trial.model!r} is neither a hub id (owner/name), a local directory "
                        f"nor {TINY_MODEL!r}")
    task = get_task(trial.task, data=trial.data, skip_bad_images=trial.skip_bad_images,
                    val_fraction=trial.val_fraction, seed=trial.seed)
    size = len(task.load_split("train").examples)
    domain = config.space.get("n_samples")
    drawn = [trial.n_samples] if domain is None else list(next(iter(domain.values())))
    largest = max((n for n in drawn if n is not None), default=None)
    if largest is not None and largest > size:
        raise UserError(f"n_samples: {largest} is larger than the {trial.task} train split ({size} questions)")
    if trial.model == TINY_MODEL:
        resolve_model(TINY_MODEL)  # built once here, not by each of the first trials at the same time


def run_sweep(config: SweepConfig, *, address: str | None, resume: bool, command: str) -> SweepOutcome:
    """Connect, open (or reopen) the sweep's MLflow parent run, run Tune to the end."""
    from runner.tracking import Tracker, default_tracking_uri, save_sweep_state, sweep_state_file

    storage_path = config.storage
    # Our MLflow callback queues failed writes and retries them at the next event: no need for the
    # client's own minutes-long retry loop to stall the sweep driver during an outage.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    state_file = sweep_state_file(config.state_dir)
    if resume and not state_file.exists():
        raise UserError(f"--resume: no sweep named {config.name!r} in {storage_path}")
    if not resume and state_file.exists():
        raise UserError(f"name: a sweep {config.name!r} already exists in {storage_path}; "
                        f"pass --resume to continue it or choose another name (name=...)")
    check_inputs(config)  # data, model, sizes: before anything is written or started
    tracking_uri = config.tracking_uri or default_tracking_uri()
    tracker = Tracker(tracking_uri, config.experiment)  # fails fast (exit 2) on an unusable URI
    resources = connect(address)
    max_concurrent = concurrency(config, resources)
    if resume:
        import json

        sweep_run_id = json.loads(state_file.read_text())["sweep_run_id"]
        tracker.client.update_run(sweep_run_id, status="RUNNING")
    else:
        sweep_run_id = tracker.start_sweep(config.name, config_dict(config), command, tags={
            "runner.task": config.trial.task, "runner.base_model": config.trial.model,
            "runner.precision": config.trial.precision})
        save_sweep_state(config.state_dir, {"sweep_run_id": sweep_run_id, "tracking_uri": tracking_uri,
                                                      "experiment": config.experiment, "config": config_dict(config)})
    if address is None and 0 < config.resources.gpu < 1 and not mps_running():
        log.warning("trials share GPUs (resources.gpu=%g) but CUDA MPS is not running: their kernels will be "
                    "time-sliced (4 int8 trials on one card: 1.74x one trial's throughput without MPS, 4.07x "
                    "with it; docs/PERFORMANCE.md). Start it with `nvidia-cuda-mps-control -d`.",
                    config.resources.gpu)
    log.info("sweep %s: up to %d trials at once on %s; MLflow run %s at %s", config.name, max_concurrent,
             {k: v for k, v in resources.items() if k in ("CPU", "GPU")}, sweep_run_id, tracking_uri)
    callbacks = [trial_runs(config, tracking_uri, sweep_run_id)]
    tuner = build_tuner(config, storage_path, callbacks, max_concurrent, restore=resume)
    results = tuner.fit()
    failed = sum(result.error is not None for result in results)
    tracker.client.set_tag(sweep_run_id, "runner.failed_trials", str(failed))
    tracker.client.set_terminated(sweep_run_id, "FINISHED")
    return SweepOutcome(sweep_run_id=sweep_run_id, results=results, path=f"{storage_path.rstrip('/')}/{config.name}")


def mps_running() -> bool:
    """Whether this machine's CUDA MPS control daemon is up (its pipe, where CUDA clients look for it)."""
    return (Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")) / "control").exists()


def trial_runs(config: SweepConfig, tracking_uri: str, sweep_run_id: str):
    from runner.tracking import TrialRuns

    return TrialRuns(tracking_uri, config.experiment, sweep_run_id, config.metric, config.mode,
                     config.trial.to_dict(), config.storage, journal_file(config))


def journal_file(config: SweepConfig) -> Path:
    """MLflow updates that could not be written yet."""
    return config.state_dir / "mlflow_pending.jsonl"


def config_dict(config: SweepConfig) -> dict[str, Any]:
    import dataclasses

    return dataclasses.asdict(config)
