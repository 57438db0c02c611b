"""Random search vs Optuna's TPE on the same space and the same ASHA scheduler: the best validation score
after a quarter, half and all of the trials, and each sweep's wall time, for several seeds. The tiny model on
easy-VQA, real `runner tune` sweeps (Ray Tune + Train, MLflow in one SQLite file per sweep under --work).

    # the GPU comparison (16 trials x 3 seeds, 4 trials per card at once), one sweep after another:
    python bench/search.py --out $OUT trial.precision=int8 trial.device=cuda resources.gpu=0.25 resources.cpu=2
    # all six sweeps at once on one shared Ray cluster (one GPU, 24 logical CPUs on 16 cores, 3 trials per sweep):
    python bench/search.py --parallel --ray-cpus 24 --out $OUT --work /tmp/bench-work trial.precision=int8 \\
        trial.device=cuda resources.gpu=0.05 resources.cpu=1 max_concurrent_trials=3
    # reduced, on CPU (a few minutes on 2 cores):
    python bench/search.py --trials 2 --seeds 0 trial.epochs=1 trial.max_eval_examples=50 \\
        "space.n_samples={choice: [64]}"

Extra arguments are `key=value` overrides of the sweep (the same as `runner tune`'s). The searcher's seed is
`trial.seed`, which also seeds each trial's training: a seed changes both, for both searchers alike. Rows are
printed (and appended to --out/search.md) as each sweep ends, so a run stopped by a time limit keeps them; with
--parallel a SIGTERM (`timeout`) also prints the unfinished sweeps' trials so far, marked partial.

--parallel starts one Ray head (`ray start`) and every sweep joins it with `--address`, all at once. Each sweep
sizes its concurrency from the whole cluster, so cap it (`max_concurrent_trials`) so that all sweeps' trials
fit. The random and Optuna sweeps of a seed run side by side, under the same contention; wall times are then
under the shared load of all sweeps, not one sweep's time alone.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SPACE_FILE = REPO / "search_spaces" / "quickstart.yaml"
METRIC = "val_exact_match"
RAY_PORT = 6390
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command, also where only the package is on the path
# Every knob the issue (#17) made searchable; the same for both searchers. Optuna takes no grid.
SPACE = ("space={lora_rank: {choice: [4, 8, 16, 32]}, lora_alpha: {times: [2, lora_rank]}, "
         "learning_rate: {loguniform: [1.0e-4, 3.0e-2]}, lora_dropout: {uniform: [0.0, 0.2]}, "
         "warmup_ratio: {uniform: [0.0, 0.2]}, weight_decay: {choice: [0.0, 0.01, 0.1]}, "
         "lora_targets: {choice: ['q,v', 'q,k,v,o', 'q,k,v,o,wi,wo', 'q,v,query,value']}, "
         "n_samples: {choice: [2000]}}")
SCHEDULER = "scheduler={type: asha, grace_period: 1, reduction_factor: 2}"


def start_sweep(search: str, seed: int, trials: int, work: Path, overrides: list[str],
                address: str | None) -> subprocess.Popen:
    """One `runner tune` sweep, started; its output goes to work/<name>.log."""
    name = f"search-{search}-seed{seed}"
    command = [sys.executable, "-m", "runner.cli", "tune", str(SPACE_FILE), f"name={name}", f"search={search}",
               f"num_samples={trials}", f"trial.seed={seed}", SPACE, SCHEDULER, f"metric={METRIC}",
               f"storage_path={work / 'ray'}", f"tracking_uri={tracking_uri(work, name)}", *overrides, "--no-promote"]
    command += ["--address", address] if address else []
    with open(work / f"{name}.log", "w") as log:
        return subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def tracking_uri(work: Path, name: str) -> str:
    # One database per sweep: sweeps started at once would race creating one file's schema, and share its lock.
    return f"sqlite:///{work / (name + '.db')}"


def trial_scores(work: Path, search: str, seed: int) -> list[float]:
    """The best validation score of each trial of a sweep in start order (so far, for one still running)."""
    from runner.tracking.client import find_sweep

    name = f"search-{search}-seed{seed}"
    tracker, parent = find_sweep(tracking_uri(work, name), name)
    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' "
                                      "and tags.`runner.kind` = 'trial'")
    runs.sort(key=lambda run: run.info.start_time)
    # A trial that failed (no epoch) scores nothing; ASHA-stopped ones count their best epoch.
    return [run.data.metrics.get(f"best_{METRIC}", float("-inf")) for run in runs]


def best_after(scores: list[float], count: int) -> float:
    return max(scores[:count], default=float("nan"))


class Table:
    """The rows, printed and appended to --out/search.md as they come."""

    def __init__(self, path: Path, marks: list[int], note: str):
        self.path, self.marks = path, marks
        header = ("| search | seed | " + " | ".join(f"best after {m}" for m in marks) + " | wall s |\n"
                  + "| --- " * (len(marks) + 3) + "|")
        with path.open("a") as handle:
            handle.write(f"\n{time.strftime('%Y-%m-%d %H:%M')} {note}\n\n{header}\n")
        print(header, flush=True)

    def row(self, search: str, seed: int | str, scores: list[float], wall: str) -> None:
        # A mark the sweep did not reach (cut short) shows no score rather than an earlier trial's.
        cells = [f"{best_after(scores, m):.3f}" if len(scores) >= m else "–" for m in self.marks]
        self.write(f"| {search} | {seed} | " + " | ".join(cells) + f" | {wall} |")

    def write(self, line: str) -> None:
        print(line, flush=True)
        with self.path.open("a") as handle:
            handle.write(line + "\n")


def start_cluster(work: Path, cpus: int) -> str:
    """One Ray head for all sweeps: the machine's one GPU, `cpus` logical CPUs, its files under work/. With its
    dashboard, as a sweep's own local cluster has: the State API that Ray Train's PlacementGroupCleaner polls
    lives there. Without it (2026-12-02, --include-dashboard=false) no trial after the first three of each
    sweep got its worker within 300 s, a likely but unproven cause."""
    # What `runner tune` sets for the local cluster it starts itself (a joined cluster's workers inherit the
    # environment of `ray start`, not of the sweep), its longer worker start-up limit included.
    from runner.sweep.tuner import LOCAL_CLUSTER_ENV, RAY_ENV

    for key, value in {**LOCAL_CLUSTER_ENV, **RAY_ENV}.items():
        os.environ.setdefault(key, value)
    subprocess.run([*RAY, "start", "--head", f"--port={RAY_PORT}", "--node-ip-address=127.0.0.1", "--num-gpus=1",
                    f"--num-cpus={cpus}", f"--temp-dir={work / 'ray-tmp'}", "--dashboard-host=127.0.0.1",
                    "--disable-usage-stats"], check=True, stdout=subprocess.DEVNULL)
    return f"127.0.0.1:{RAY_PORT}"


def run_parallel(args: argparse.Namespace, overrides: list[str], table: Table,
                 results: dict[str, list[tuple[list[float], float]]]) -> None:
    """All sweeps at once on one cluster; a row as each ends, and the unfinished ones' trials on SIGTERM."""
    address = start_cluster(args.work, args.ray_cpus)
    started = time.perf_counter()
    running = {(search, seed): start_sweep(search, seed, args.trials, args.work, overrides, address)
               for seed in args.seeds for search in args.searches}

    def cut(signum: int, frame: object) -> None:
        # `timeout` signals its child and then its whole process group, this process again: only the first
        # SIGTERM breaks the wait, a second would break the partial rows (as it did on 2026-12-02).
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise KeyboardInterrupt  # out of the wait below, to the partial rows

    signal.signal(signal.SIGTERM, cut)
    try:
        while running:
            for (search, seed), process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[(search, seed)]
                wall = time.perf_counter() - started
                if process.returncode != 0:
                    table.write(f"| {search} | {seed} | failed (exit {process.returncode}); see "
                                f"search-{search}-seed{seed}.log |")
                    continue
                scores = trial_scores(args.work, search, seed)
                results.setdefault(search, []).append((scores, wall))
                table.row(search, seed, scores, f"{wall:.0f} (shared)")
            time.sleep(2)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # every sweep ended: a late cut must not break the mean rows
    except KeyboardInterrupt:
        wall = time.perf_counter() - started
        for (search, seed), process in running.items():
            process.terminate()
            try:  # the trials the sweep logged before the cut
                scores = trial_scores(args.work, search, seed)
            except Exception as error:  # noqa: BLE001 (a sweep cut before its parent run exists)
                table.write(f"| {search} | {seed} | cut at {wall:.0f} s, nothing logged ({error}) |")
                continue
            table.row(search, seed, scores, f"cut at {wall:.0f} (shared), partial: {len(scores)} trials")
    finally:
        subprocess.run([*RAY, "stop", "--force"], check=False, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--searches", nargs="+", default=["random", "optuna"])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "bench-search", help="where search.md goes")
    parser.add_argument("--work", type=Path, default=None,
                        help="the sweeps' logs, MLflow database and artifacts, Ray storage (default: --out)")
    parser.add_argument("--parallel", action="store_true", help="all sweeps at once on one shared Ray cluster")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count(),
                        help="--parallel: logical CPUs of the shared cluster")
    args, overrides = parser.parse_known_args()
    args.work = (args.work or args.out).resolve()
    for folder in (args.out, args.work):
        folder.mkdir(parents=True, exist_ok=True)
    marks = sorted({max(1, args.trials // 4), max(1, args.trials // 2), args.trials})
    mode = (f"all {len(args.seeds) * len(args.searches)} sweeps at once on one Ray cluster "
            f"({args.ray_cpus} CPUs, 1 GPU); wall times under that shared load" if args.parallel else "sequential")
    table = Table(args.out / "search.md", marks, f"{mode}; overrides: {' '.join(overrides) or 'none'}")
    results: dict[str, list[tuple[list[float], float]]] = {}
    if args.parallel:
        run_parallel(args, overrides, table, results)
    else:
        for seed in args.seeds:
            for search in args.searches:
                started = time.perf_counter()
                process = start_sweep(search, seed, args.trials, args.work, overrides, None)
                if process.wait() != 0:
                    raise SystemExit(f"search-{search}-seed{seed} failed (exit {process.returncode}); "
                                     f"see {args.work}/search-{search}-seed{seed}.log")
                wall = time.perf_counter() - started
                scores = trial_scores(args.work, search, seed)
                results.setdefault(search, []).append((scores, wall))
                table.row(search, seed, scores, f"{wall:.0f}")
    for search, runs in results.items():  # the mean over the seeds whose sweep finished
        means = [statistics.mean(best_after(scores, m) for scores, _ in runs) for m in marks]
        table.write(f"| {search} | mean of {len(runs)} | " + " | ".join(f"{value:.3f}" for value in means)
                    + f" | {statistics.mean(wall for _, wall in runs):.0f} |")


if __name__ == "__main__":
    main()
