"""What a person sees: a quiet console by default, everything with `-v`, and always a full log file.

Quiet means our own lines (the `runner` loggers at INFO) and every library's warnings and errors, except
a short list of known-harmless ones. Each of those is stopped where it is raised — a log record by its
logger and message, a Python warning by its message and category — never by catching output, so a new
warning, or the same library saying something else, still shows. Libraries' progress chatter is turned
down by their own settings (MLflow's logging level and progress bars, the hub's progress bars, Ray Train's
`LoggingConfig`, Tune's verbosity).

The sweep's Ray processes get the same settings: `worker_env()` goes into the job's runtime env, and
`setup_worker_process` is its `worker_process_setup_hook`. A Train worker's own INFO lines stay in Ray's
log files (the driver prints one line per epoch from Tune's results instead: runner/sweep/progress.py).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

VERBOSE_ENV = "RUNNER_VERBOSE"  # "1": show everything, in the CLI and in every Ray process of the sweep
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
OURS = "runner"

# Known-harmless log records: (logger, how the message starts, why it is harmless).
HARMLESS_RECORDS = (
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community",
     "an optional CPU kernel for 4-bit weights, said at import; nf4 never runs on CPU here"),
    ("bitsandbytes.autograd._functions", "MatMul8bitLt: inputs will be cast from",
     "said on every int8 matmul whose activations are not fp16 (bf16 or fp32 ones are cast, as designed): "
     "97,455 lines in one 4-trial GPU sweep"),
    ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
     "Detected that the Ray Train controller actor",
     "said after every trial, once its Train controller has exited; the cleaner then frees the placement group"),
    ("ray.tune.execution.tune_controller", "Trial task failed for trial",
     "Tune's traceback of a failed trial; the console says `trial … failed: <reason> (full error: <Tune's "
     "error.txt>)` and the trial's MLflow run holds the reason (runner.error)"),
    ("ray.tune.tune", "Experiment has been interrupted, but the most recent state was saved",
     "Tune's resume hint names its Python API (`Tuner.restore(path=..., trainable=...)`); an interrupted sweep's "
     "own line names the command that resumes it (`runner tune … --resume`)"),
    ("ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
     "Failed to send resource request",
     "a GetTimeoutError traceback at Train start-up that Ray itself calls safe to ignore when transient; "
     "if it persists the worker group does not start and the trial fails with Ray Train's own error"),
)
# Known-harmless Python warnings: (regex the message starts with, category, why it is harmless).
HARMLESS_WARNINGS = (
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning,
     "PEFT 0.21 asks transformers 5 by the old name; the answer is the same"),
    (r"MatMul8bitLt: inputs will be cast from", UserWarning,
     "older bitsandbytes warn instead of logging (see HARMLESS_RECORDS)"),
    (r"(\x1b\[[0-9;]*m)?An input example was not provided when logging the model", UserWarning,
     "the registered model states its signature (runner/registry/pyfunc.py); an example would only add a "
     "prediction run at registration"),
)


def is_verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def worker_env(verbose: bool) -> dict[str, str]:
    """Environment for the CLI and every Ray process of the sweep: the libraries' own quiet switches."""
    if verbose:
        return {VERBOSE_ENV: "1"}
    return {VERBOSE_ENV: "0",
            "MLFLOW_LOGGING_LEVEL": "WARNING",  # "Creating initial MLflow database tables..." and the like
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # a bar per download, even of 10 small files
            "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # transformers' "Loading weights" bar follows this switch
            # Tune's classic output, silent at verbosity 0; the newer one prints its config box regardless.
            "RAY_AIR_NEW_OUTPUT": "0",
            # Tune warns of any driver step over 0.5 s: a trial's first result opens its MLflow run (0.5 s
            # seen on the GPU host, four lines each time); a real stall still warns.
            "TUNE_WARN_THRESHOLD_S": "2",
            # torch's C++ warnings, e.g. c10d's "hostname of the client socket cannot be retrieved" from every
            # Train worker on a host without a name in DNS; its errors still show.
            "TORCH_CPP_LOG_LEVEL": "ERROR"}


class HarmlessRecords(logging.Filter):
    """Drops one logger's known-harmless records, by how their message starts."""

    def __init__(self, starts: tuple[str, ...]):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


def stop_harmless() -> None:
    """Filter the known-harmless records and warnings at their source (idempotent)."""
    starts: dict[str, tuple[str, ...]] = {}
    for name, start, _ in HARMLESS_RECORDS:
        starts[name] = starts.get(name, ()) + (start,)
    for name, prefixes in starts.items():
        logger = logging.getLogger(name)
        logger.filters = [f for f in logger.filters if not isinstance(f, HarmlessRecords)]
        logger.addFilter(HarmlessRecords(prefixes))
    for message, category, _ in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


class Console(logging.Filter):
    """The console's share of the log: our INFO lines, everyone's warnings and errors."""

    def filter(self, record: logging.LogRecord) -> bool:
        ours = record.name == OURS or record.name.startswith(OURS + ".")
        return record.levelno >= (logging.INFO if ours else logging.WARNING)


def setup(verbose: bool) -> None:
    """The CLI's logging: quiet console (or everything), harmless chatter stopped where it is raised."""
    for key, value in worker_env(verbose).items():
        os.environ.setdefault(key, value)  # a user's own setting wins
    os.environ[VERBOSE_ENV] = "1" if verbose else "0"
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(FORMAT, datefmt="%H:%M:%S"))
    if not verbose:
        handler.addFilter(Console())
        stop_harmless()
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler], force=True)
    logging.getLogger(OURS).setLevel(logging.DEBUG)  # our debug lines reach the sweep's log file


class SweepLog(logging.FileHandler):
    """The sweep's full log file. A record its disk cannot take (a full disk: runner/sweep/storage.py stops
    the sweep) is said once on stderr, not as logging's own traceback for every record."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        import sys

        error = sys.exc_info()[1]
        if not isinstance(error, OSError):
            return super().handleError(record)
        if not self.failed:
            sys.stderr.write(f"warning: cannot write the sweep's log {self.baseFilename} ({error}); the console "
                             "still shows what it always does\n")
        self.failed = True


def log_to(path: Path) -> Path:
    """Also write every record (whatever the console shows) to `path`, appended: the full log of a sweep."""
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    if not any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == path.resolve()
               for h in root.handlers):
        handler = SweepLog(path)
        handler.setFormatter(logging.Formatter(FORMAT.replace("%(asctime)s", "%(asctime)s.%(msecs)03d"),
                                               datefmt="%Y-%m-%d %H:%M:%S"))
        root.addHandler(handler)
    return path


def setup_worker_process() -> None:
    """Ray's `worker_process_setup_hook` for the sweep's processes: the same harmless list there."""
    if not is_verbose():
        stop_harmless()


def quiet_train_worker() -> None:
    """In a Train worker (after Ray Train configured its logging): INFO goes to Ray's log files only."""
    if is_verbose():
        return
    stop_harmless()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.WARNING)

