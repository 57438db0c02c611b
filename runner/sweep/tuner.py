"""The tuner: connect to Ray, size the concurrency, build (or restore) the Tuner and run the sweep.

Tune's own pieces do the work: a seeded searcher draws trials (`BasicVariantGenerator`, or Optuna's TPE
through `OptunaSearch`), ASHA stops weak ones between epochs, `Tuner.restore` resumes — the searcher's
state included, which Tune saves with the experiment. MLflow hangs off the driver as a Tune callback
(runner/tracking/callback.py); the trials themselves (runner/sweep/trial.py) never touch it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune
from ray.tune.search.optuna import OptunaSearch

from runner.config import SweepConfig
from runner.errors import Interrupted, UserError
from runner.eval.held_out import WarmScorer
from runner.sweep import state, storage
from runner.sweep.tail import ScorerInTail, warm_scorer
from runner.sweep.trial import (
    DRIVER_CPU,
    HEAD_RESOURCE,
    TRIAL_FUNCTION_RESOURCES,
    run_trial,
)

log = logging.getLogger(__name__)


@dataclass
class SweepOutcome:
    sweep_run_id: str
    results: Any  # ray.tune.ResultGrid
    scorer: WarmScorer | None = None  # the test scorer loaded in the sweep's tail (runner/sweep/tail.py)


# Ray's settings for every sweep, set before Ray starts (a user's own setting wins): Train V2; and a trial
# failing by its own settings reports only its reason (runner/sweep/trial.py), which Tune's strict metric
# check would turn into an error for the whole sweep.
RAY_ENV = {"RAY_TRAIN_V2_ENABLED": "1", "TUNE_DISABLE_STRICT_METRIC_CHECKING": "1"}
# And for a local cluster: a throwaway one needs no token (a real cluster keeps Ray's token auth); nothing
# preempts a local machine, and the preemption watcher's actor makes Ray core log an error per trial; two
# trials starting at once on a small, busy machine can take longer than Train's 60 s worker start-up limit,
# which on one machine only ever means "slow", never "lost".
LOCAL_CLUSTER_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
                     "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "300"}


def connect(address: str | None) -> dict[str, float]:
    """Start a local Ray cluster (address None) or join one; return its resources."""
    from runner import console

    for key, value in {**RAY_ENV, **(LOCAL_CLUSTER_ENV if address is None else {})}.items():
        os.environ.setdefault(key, value)
    if address not in (None, "auto") and not address.startswith("ray://"):
        check_reachable(address)
    if not ray.is_initialized():
        # The sweep's Ray processes log like the CLI: quiet unless -v (runner/console.py).
        env = {key: os.environ.get(key, value) for key, value in console.worker_env(console.is_verbose()).items()}
        env.update(own_cluster_env(address))
        try:
            context = ray.init(
                address=address or "local", dashboard_host="127.0.0.1", logging_level=logging.WARNING,
                log_to_driver=True, include_dashboard=None,
                runtime_env={"env_vars": env, "worker_process_setup_hook": "runner.console.setup_worker_process"})
        except (ConnectionError, ValueError, RuntimeError) as error:
            raise UserError(f"--address {address}: cannot connect to a Ray cluster: {error}") from error
        log.debug("Ray's own logs of this sweep's processes: %s/logs", context.address_info.get("session_dir"))
    return ray.cluster_resources()


def own_cluster_env(address: str | None) -> dict[str, str]:
    """`RAY_ADDRESS` for the sweep's Ray processes, naming their own cluster. Ray Train's placement-group cleaner
    looks its cluster up by RAY_ADDRESS; with another Ray running on the machine it fails instead ("Found multiple
    active Ray instances"), a finished trial's placement group is never freed and the next trial's workers wait
    for it until Train's start-up limit. A local cluster's GCS port is chosen here (`RAY_GCS_SERVER_PORT`, read
    when Ray starts a head) so that its address is known before it starts."""
    if address is None:
        import socket

        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        os.environ["RAY_GCS_SERVER_PORT"] = str(port)
        return {"RAY_ADDRESS": f"{ray.util.get_node_ip_address()}:{port}"}
    return {} if address == "auto" or address.startswith("ray://") else {"RAY_ADDRESS": address}


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


class LocalClusterHold:
    """One sweep at a time runs a local Ray cluster on a machine: a second would compete for the same cores
    and its trials miss Ray Train's start-up limit (docs/TRAPS.md). The second is refused at once, naming
    the sweep that holds the machine and how to join its cluster instead. An flock in the node's cache
    folder, held while the sweep runs (the kernel releases it however the process ends)."""

    def __init__(self, sweep: str):
        import fcntl

        from runner.model.paths import cache_dir

        self.sweep = sweep
        path = cache_dir() / "local-cluster.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.handle = path.open("a+")
        try:
            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.handle.seek(0)
            holder = json.loads(self.handle.read() or "{}")
            self.handle.close()
            join = (f"join its cluster with --address {holder['address']}" if holder.get("address")
                    else "try again in a minute to see its cluster's address")
            raise UserError(f"--address: sweep {holder.get('sweep', '?')!r} (pid {holder.get('pid', '?')}) is "
                            f"running a local Ray cluster on this machine; wait for it to end, or {join}") from None
        self.announce(None)

    def announce(self, address: str | None) -> None:
        """Record who holds the machine, and (once started) the address of its cluster."""
        self.handle.seek(0)
        self.handle.truncate()
        self.handle.write(json.dumps({"sweep": self.sweep, "pid": os.getpid(), "address": address}))
        self.handle.flush()

    def __enter__(self) -> LocalClusterHold:
        return self

    def __exit__(self, *exc) -> None:
        self.handle.close()  # closing the file releases the flock


def check_cluster(config: SweepConfig, address: str | None) -> None:
    """What is known before anything starts: an `--address` answers, and a local cluster (this machine)
    has a GPU when the trials ask for one — in seconds, before the data loads or MLflow is touched."""
    if address not in (None, "auto") and not address.startswith("ray://"):
        check_reachable(address)
    if address is None and config.resources.gpu > 0:
        import torch

        if torch.cuda.device_count() == 0:
            raise UserError(f"resources.gpu: {config.resources.gpu:g} GPU per trial requested but the cluster has 0 "
                            "GPUs (a local cluster on this machine, which has no CUDA GPU visible); run on a GPU "
                            "machine, join a GPU cluster with --address, or set resources.gpu=0")


def concurrency(config: SweepConfig, resources: dict[str, float], head_cpus: float | None = None) -> int:
    """How many trials fit at once: by GPU share, by CPU (worker share + the trial driver's), and by the head
    node's CPUs (`head_cpus`, if given), where every trial's driver runs (TRIAL_FUNCTION_RESOURCES)."""
    cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
    need = config.resources
    if head_cpus is not None and head_cpus < DRIVER_CPU:
        raise UserError(f"--address: the cluster's head node has {head_cpus:g} CPUs; each trial's Tune function runs "
                        f"there ({DRIVER_CPU} CPU apiece, so that losing a GPU node loses no trial) — start the head "
                        "with CPUs (`ray start --head --num-cpus=4`; cluster.yaml gives it 4)")
    if need.gpu > 0 and gpus < need.gpu:
        raise UserError(f"resources.gpu: {need.gpu} GPU per trial requested but the cluster has {gpus:g} GPUs")
    if cpus < need.cpu + DRIVER_CPU:
        raise UserError(f"resources.cpu: {need.cpu} CPU per trial (+{DRIVER_CPU} for its driver) requested "
                        f"but the cluster has {cpus:g} CPUs")
    fit = math.floor(cpus / (need.cpu + DRIVER_CPU) + 1e-9)
    if need.gpu > 0:
        fit = min(fit, math.floor(gpus / need.gpu + 1e-9))
    if head_cpus is not None:
        fit = min(fit, math.floor(head_cpus / DRIVER_CPU + 1e-9))
    if config.max_concurrent_trials is not None:
        fit = min(fit, config.max_concurrent_trials)
    return max(1, fit)


def head_cpus() -> float:
    """The CPUs of the connected cluster's head node."""
    return sum(node["Resources"].get("CPU", 0.0) for node in ray.nodes()
               if node["Alive"] and HEAD_RESOURCE in node["Resources"])


def make_scheduler(config: SweepConfig):
    if config.scheduler.type == "none":
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(time_attr="epoch", max_t=config.trial.epochs, grace_period=config.scheduler.grace_period,
                         reduction_factor=config.scheduler.reduction_factor)


def trial_count(config: SweepConfig) -> int:
    """How many trials the sweep runs: Tune repeats the whole grid `num_samples` times."""
    count = config.num_samples
    for domain in config.space.values():
        if domain.kind == "grid":
            count *= len(domain.values)
    return count


def param_space(config: SweepConfig) -> dict[str, Any]:
    """Tune's param_space: the random searcher's domains. Optuna gets its space from `OptunaSpace` instead
    (a searcher built with a space refuses a param_space with domains in it)."""
    if config.search == "optuna":
        return {}
    base = config.trial.to_dict()
    return {key: tune.sample_from(Times(*domain.values, base)) if domain.derived else domain.to_tune()
            for key, domain in config.space.items()}


@dataclass(frozen=True)
class Times:
    """A derived key (`{times: [factor, source]}`) for Tune's sample_from: factor × the trial's source value.
    A class, not a lambda: searcher state is pickled with the experiment."""

    factor: float
    source: str
    base: dict[str, Any]

    def __call__(self, config: dict[str, Any]) -> float:
        return self.factor * config.get(self.source, self.base[self.source])


class OptunaSpace:
    """The space as an Optuna define-by-run function: each drawn key one `trial.suggest_*`, in the space
    file's order; derived keys returned as constants (OptunaSearch adds them to the trial's config, so
    MLflow and the checkpoint see the value the trial trained with)."""

    def __init__(self, space: dict[str, Any], base: dict[str, Any]):
        self.space, self.base = space, base

    def __call__(self, trial) -> dict[str, Any]:
        drawn = {}
        for key, domain in self.space.items():
            kind, values = domain.kind, domain.values
            if kind == "choice":
                drawn[key] = trial.suggest_categorical(key, list(values))
            elif kind in ("uniform", "loguniform"):
                drawn[key] = trial.suggest_float(key, *values, log=kind == "loguniform")
            elif kind in ("randint", "lograndint"):  # Tune's upper end is exclusive, Optuna's inclusive
                drawn[key] = trial.suggest_int(key, values[0], values[1] - 1, log=kind == "lograndint")
        return {key: Times(*domain.values, self.base)({**self.base, **drawn})
                for key, domain in self.space.items() if domain.derived}


class MetricResultsOptuna(OptunaSearch):
    """Ray's OptunaSearch, told only of results that carry the metric: a trial failing by its settings
    reports just its reason (runner/sweep/trial.py), which OptunaSearch would take for a KeyError."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            super().on_trial_result(trial_id, result)


def search_algorithm(config: SweepConfig, max_concurrent: int):
    """Seeded by trial.seed: the same space file draws the same trials. A search_alg of our own must carry
    the concurrency limit itself (TuneConfig's only reaches the default one)."""
    if config.search == "optuna":
        from ray.tune.search import ConcurrencyLimiter

        optuna = MetricResultsOptuna(space=OptunaSpace(config.space, config.trial.to_dict()), metric=config.metric,
                                     mode=config.mode, seed=config.trial.seed)
        return ConcurrencyLimiter(optuna, max_concurrent=max_concurrent)
    from ray.tune.search.basic_variant import BasicVariantGenerator

    return BasicVariantGenerator(random_state=config.trial.seed, max_concurrent=max_concurrent)


def build_tuner(config: SweepConfig, callbacks: list, max_concurrent: int, restore: bool,
                this_run: list = ()) -> tune.Tuner:
    """`this_run`: callbacks whose state belongs to this driver process (what it counts, the actor it starts):
    a restored sweep runs these, never the copies of them pickled with the first run's RunConfig."""
    from runner import console

    storage_path = config.storage
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=config.trial.to_dict(), gpu=config.resources.gpu,
                             cpu=config.resources.cpu, max_failures=config.max_failures,
                             storage_path=storage_path, sweep=config.name),
        TRIAL_FUNCTION_RESOURCES,
    )
    verbose = 1 if console.is_verbose() else 0  # Tune's own status tables only with -v (progress.py: ours)
    if restore:
        tuner = tune.Tuner.restore(f"{storage_path.rstrip('/')}/{config.name}", trainable=trainable,  # a URI too
                                   param_space=param_space(config), resume_unfinished=True, resume_errored=False)
        # Restore brings back the first run's RunConfig, its verbosity too (a sweep started with -v resumed
        # quietly printed Tune's tables); Ray 2.60 has no public setter: Tune itself sets the restored
        # config's name and storage_path this way.
        if tuner._local_tuner is not None:  # None through a ray:// client (its tuner runs on the cluster)
            run_config = tuner._local_tuner._run_config
            run_config.verbose = verbose
            run_config.callbacks = [c for c in run_config.callbacks or []
                                    if not isinstance(c, (Finished, ScorerInTail))] + list(this_run)
        return tuner
    return tune.Tuner(
        trainable,
        param_space=param_space(config),
        tune_config=tune.TuneConfig(
            metric=config.metric, mode=config.mode, scheduler=make_scheduler(config),
            num_samples=config.num_samples, search_alg=search_algorithm(config, max_concurrent)),
        run_config=tune.RunConfig(name=config.name, storage_path=storage_path, callbacks=[*callbacks, *this_run],
                                  verbose=verbose,
                                  failure_config=tune.FailureConfig(max_failures=0)),
    )


def check_inputs(config: SweepConfig):
    """What would otherwise fail inside every trial, checked once on the driver: the searcher's package is
    there, the data loads, every n_samples the space can draw fits the train split, the model directory
    exists, int8 has a GPU. Returns the task (its train and validation splits loaded)."""
    import importlib.util

    from runner.model.paths import resolve_model
    from runner.tiny import TINY_MODEL
    from tasks import get_task

    trial = config.trial
    if config.search == "optuna" and importlib.util.find_spec("optuna") is None:
        raise UserError("search: optuna needs the optuna package (pip install optuna==4.1.0, see requirements.txt)")
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
    largest = trial.n_samples if domain is None else domain.largest
    if largest is not None and largest > size:
        raise UserError(f"n_samples: {largest} is larger than the {trial.task} train split ({size} questions)")
    resolve_model(trial.model)  # the tiny artifact is verified once here, before any trial starts
    return task


def run_sweep(config: SweepConfig, *, address: str | None, resume: bool, command: str,
              say: Callable[[str], None] = print, score_in_tail: bool = False) -> SweepOutcome:
    """Connect, open (or reopen) the sweep's MLflow parent run, run Tune to the end. `score_in_tail`: load the
    test scorer in the first GPU share the last trials free (promotion follows)."""
    if resume and not state.exists(config):
        raise UserError(f"--resume: no sweep named {config.name!r} in {config.storage}")
    if not resume and state.exists(config):
        raise UserError(f"name: a sweep {config.name!r} already exists in {config.storage}; "
                        f"pass --resume to continue it or choose another name (name=...)")
    check_cluster(config, address)
    with LocalClusterHold(config.name) if address is None else contextlib.nullcontext() as hold:
        return run_tuner(config, address=address, resume=resume, command=command, say=say, hold=hold,
                         score_in_tail=score_in_tail)


def run_tuner(config: SweepConfig, *, address: str | None, resume: bool, command: str, say: Callable[[str], None],
              hold: LocalClusterHold | None, score_in_tail: bool) -> SweepOutcome:
    from runner import console
    from runner.sweep.progress import SweepProgress
    from runner.tracking.callback import TrialRuns
    from runner.tracking.client import Tracker, default_tracking_uri
    from runner.tracking.datasets import describe as describe_data

    task = check_inputs(config)  # data, model, sizes: before anything is written or started
    tracking_uri = config.tracking_uri or default_tracking_uri()
    tracker = Tracker(tracking_uri, config.experiment)  # fails fast (exit 2) on an unusable URI
    datasets = describe_data(task, config.trial.data)
    reserved = storage.reserve(config)  # a disk too full for the sweep's own state is refused here
    log_file = console.log_to(state.log_file(config))
    resources = connect(address)
    if hold is not None:
        hold.announce(ray.get_runtime_context().gcs_address)
    max_concurrent = concurrency(config, resources, head_cpus())
    if resume:
        sweep_run_id = state.read(config)["sweep_run_id"]
        tracker.client.update_run(sweep_run_id, status="RUNNING")
    else:
        sweep_run_id = tracker.start_sweep(config.name, config.to_dict(), command, tags={
            "runner.task": config.trial.task, "runner.base_model": config.trial.model,
            "runner.precision": config.trial.precision})
        state.write(config, {"sweep_run_id": sweep_run_id, "tracking_uri": tracking_uri,
                             "experiment": config.experiment, "config": config.to_dict(), "datasets": datasets})
    if address is None and 0 < config.resources.gpu < 1 and not mps_running():
        log.warning("trials share GPUs (resources.gpu=%g) but CUDA MPS is not running: their kernels will be "
                    "time-sliced (4 int8 trials on one card: 1.74x one trial's throughput without MPS, 4.07x "
                    "with it; docs/PERFORMANCE.md). Start it with `nvidia-cuda-mps-control -d`.",
                    config.resources.gpu)
    log.info("sweep %s: %d trials, up to %d at once on %g CPUs, %g GPUs; MLflow run %s; full log %s", config.name,
             trial_count(config), max_concurrent, resources.get("CPU", 0), resources.get("GPU", 0),
             sweep_run_id, log_file)
    callback = TrialRuns(tracking_uri, config.experiment, sweep_run_id, config.metric, config.mode,
                         config.trial.to_dict(), config.storage, state.journal_file(config), state.failed_file(config),
                         datasets)
    progress = SweepProgress(list(config.space), config.metric, config.trial.epochs, say)
    guard = [storage.StorageGuard(reserved)] if reserved else []
    scorer = warm_scorer(config) if score_in_tail else None
    tail = [ScorerInTail(scorer, trial_count(config))] if scorer else []
    finished = Finished()
    results = build_tuner(config, [callback, progress, *guard], max_concurrent, restore=resume,
                          this_run=[*tail, finished]).fit()
    storage.check_not_stopped(config, reserved, command)  # a full disk stopped it: resumable, not ended
    # Tune returns normally when interrupted (Ctrl-C): nothing after the sweep runs on a part of it. (None: the
    # callback ran on the cluster, through a ray:// client.)
    if finished.count is not None and finished.count < trial_count(config):
        resume_command = command if command.endswith("--resume") else f"{command} --resume"
        raise Interrupted(f"sweep {config.name} interrupted with {finished.count} of {trial_count(config)} "
                          f"trials finished; its state is saved: `{resume_command}` finishes it")
    if reserved is not None:
        reserved.unlink()  # the sweep has ended: its reserve is only for its own state while it runs
    callback.end_sweep(failed_trials=sum(result.error is not None for result in results))
    return SweepOutcome(sweep_run_id=sweep_run_id, results=results, scorer=scorer)


class Finished(tune.Callback):
    """How many trials had ended (finished, stopped or failed) at Tune's last step: fewer than the sweep's when it
    was interrupted. Read at each step, not at the experiment's end: Tune's clean-up after an interrupt stops
    the running trials, which then count as terminated too."""

    count: int | None = None

    def on_step_end(self, iteration, trials, **info):
        self.count = sum(trial.is_finished() for trial in trials)

    def on_experiment_end(self, trials, **info):
        if self.count is None:  # no step ran: a restored sweep whose trials had all ended
            self.count = sum(trial.is_finished() for trial in trials)


def mps_running() -> bool:
    """Whether this machine's CUDA MPS control daemon is up (its pipe, where CUDA clients look for it)."""
    return (Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps")) / "control").exists()
