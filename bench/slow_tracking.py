"""A tracking server that answers slowly: the same small sweep with a real `mlflow server`, once straight and
once behind a proxy on 127.0.0.1 that holds every MLflow request for --delay seconds before forwarding it.
Prints, per setting: the whole `runner tune` command's wall time split into start-up (to the first trial's
start), trials (first start to last end) and after (promotion, stages, report) — from Tune's own result
files, not from MLflow, whose records may lag —, the trials' training throughput (what the workers
reported: logging must not slow training) and how many MLflow requests the proxy saw.

    python bench/slow_tracking.py --delay 2            # ~15 minutes on 2 cores
    python bench/slow_tracking.py --delay 2 --out docs/perf-slow-tracking.md

Extra `key=value` arguments override the sweep (as for `runner tune`). Both settings run one after the other
on the same machine with fresh feature caches; compare them only within one run of this script.
"""

from __future__ import annotations

import argparse
import http.server
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from tests.conftest import forward, mlflow_server  # noqa: E402  (a real server and proxy, as the tests have them)

SPACE_FILE = REPO / "search_spaces" / "quickstart.yaml"
SWEEP = ["num_samples=3", "trial.epochs=2", "trial.max_eval_examples=200", "test_max_examples=200",
         "max_concurrent_trials=1", "scheduler.type=none"]


class DelayingProxy(http.server.ThreadingHTTPServer):
    """Forwards every request to the server on `target_port` after `delay` seconds; counts them."""

    daemon_threads = True

    def __init__(self, target_port: int, delay: float):
        self.target_port, self.delay = target_port, delay
        self.calls: list[tuple[float, str]] = []  # (time, "METHOD endpoint") of every request
        self.lock = threading.Lock()
        super().__init__(("127.0.0.1", 0), Forward)


class Forward(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def forward(self):
        proxy: DelayingProxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        with proxy.lock:
            proxy.calls.append((time.time(), f"{self.command} {self.path.split('?')[0]}"))
        time.sleep(proxy.delay)
        forward(self, proxy.target_port, body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward


def run_setting(name: str, delay: float | None, work: Path, overrides: list[str]) -> dict:
    from mlflow import MlflowClient

    root = work / name
    root.mkdir(parents=True)
    with mlflow_server(f"sqlite:///{root / 'server.db'}", root / "artifacts") as base:
        proxy = None
        uri = base
        if delay is not None:
            proxy = DelayingProxy(int(base.rsplit(":", 1)[1]), delay)
            threading.Thread(target=proxy.serve_forever, daemon=True).start()
            uri = f"http://127.0.0.1:{proxy.server_address[1]}"
        env = {**os.environ, "RUNNER_CACHE": str(root / "cache"), "MLFLOW_DISABLE_TELEMETRY": "true",
               "TQDM_DISABLE": "1"}
        command = [sys.executable, "-m", "runner.cli", "tune", str(SPACE_FILE), f"name=slow-{name}",
                   f"storage_path={root / 'ray'}", f"tracking_uri={uri}", *SWEEP, *overrides]
        started = time.time()
        with open(root / "tune.log", "w") as log:
            rc = subprocess.run(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
        wall = time.time() - started
        requests = len(proxy.calls) if proxy else None
        if proxy:
            proxy.shutdown()
        if rc != 0:
            raise SystemExit(f"{name}: runner tune exited {rc}; see {root / 'tune.log'}")
        client = MlflowClient(base)
        experiment = client.get_experiment_by_name("quickstart")
        trials = client.search_runs([experiment.experiment_id], "tags.`runner.kind` = 'trial'")
        throughput = [run.data.metrics["train_samples_per_second"] for run in trials]
    # Tune's result rows: `timestamp` (whole seconds) when a result arrived, `time_total_s` since the trial began.
    rows = [json.loads(line) for path in (root / "ray" / f"slow-{name}").glob("*/result.json")
            for line in path.read_text().splitlines() if line]
    first_start = min(row["timestamp"] - row["time_total_s"] for row in rows)
    last_end = max(row["timestamp"] for row in rows)
    if proxy:  # where the requests went, by phase
        phases = {"start-up": (0, first_start), "trials": (first_start, last_end), "after": (last_end, 1e12)}
        for phase, (begin, end) in phases.items():
            calls = Counter(call for t, call in proxy.calls if begin <= t < end)
            print(f"  {name} {phase}: {sum(calls.values())} requests; most: "
                  + ", ".join(f"{call} x{n}" for call, n in calls.most_common(6)), flush=True)
    return {"setting": name, "wall": wall, "start-up": first_start - started, "trials phase": last_end - first_start,
            "after": started + wall - last_end, "trials": len(trials), "samples/s": statistics.mean(throughput),
            "requests": requests}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--delay", type=float, default=2.0, help="seconds the proxy holds every request")
    parser.add_argument("--out", type=Path, help="append the table to this markdown file")
    args, overrides = parser.parse_known_args()
    work = Path(tempfile.mkdtemp(prefix="slow-tracking-"))
    lines = ["| setting | wall s | start-up s | trials s | after s | trials | train samples/s (mean) | MLflow requests |",
             "|---|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    try:
        for name, delay in (("direct", None), (f"delay-{args.delay:g}s", args.delay)):
            row = run_setting(name, delay, work, overrides)
            lines.append(f"| {row['setting']} | {row['wall']:.0f} | {row['start-up']:.0f} | {row['trials phase']:.0f} | "
                         f"{row['after']:.0f} | {row['trials']} | {row['samples/s']:.1f} | "
                         f"{row['requests'] if row['requests'] is not None else '-'} |")
            print(lines[-1], flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        with open(args.out, "a") as out:
            out.write(f"\n{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, "
                      f"`python bench/slow_tracking.py --delay {args.delay:g} {' '.join(overrides)}`\n\n")
            out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
