"""Fast unit tests (no Ray cluster, no server, no training) for what only end-to-end tests reached before:
the MLflow callback's journal, the trial concurrency, every promotion rule, the code version, the
checkpoint format and the tiny model artifact's verification."""

import json
import os
import pickle
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from runner.config import Domain, ResourcesConfig, SweepConfig, TrialConfig
from runner.errors import UserError
from runner.registry.promote import decide
from runner.sweep.tuner import concurrency, own_cluster_env
from runner.tracking.callback import TrialRuns, failed_updates
from runner.tracking.client import PARENT_TAG, TRIAL_TAG, Tracker, code_version
from tests.conftest import REPO, fill_disk, free_port

# --- the MLflow callback's journal ------------------------------------------------------------------

def updates(trial: str, epochs: int) -> list[dict]:
    config = {"lora_rank": 4}
    out = [{"kind": "start", "trial": trial, "config": config}]
    out += [{"kind": "result", "trial": trial, "config": config, "epoch": e, "timestamp": 1000 * e,
             "metrics": {"train_loss": 1.0 / e, "val_exact_match": 0.1 * e}, "placement": "here"}
            for e in range(1, epochs + 1)]
    return out


def callback(uri: str, tmp_path: Path, sweep_run_id: str) -> TrialRuns:
    return TrialRuns(uri, "units", sweep_run_id, "val_exact_match", "max", TrialConfig().to_dict(), str(tmp_path),
                     tmp_path / "pending.jsonl", tmp_path / "failed.jsonl")


@pytest.fixture
def sqlite_sweep(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "units")
    return uri, tracker, tracker.start_sweep("s", {"name": "s"}, "runner tune", tags={})


def test_an_outage_queues_updates_in_order_and_a_replay_writes_each_once(tmp_path, sqlite_sweep):
    uri, tracker, sweep = sqlite_sweep
    down = callback(f"http://127.0.0.1:{free_port()}", tmp_path, sweep)  # nothing listens there: a real refusal
    for update in updates("t1", 2) + updates("t2", 1):
        down.submit(update)
    assert down.drain() == 5  # every update tried, none written
    queued = [json.loads(line) for line in (tmp_path / "pending.jsonl").read_text().splitlines()]
    assert queued == updates("t1", 2) + updates("t2", 1)  # all kept, in order, nothing refused
    assert not (tmp_path / "failed.jsonl").exists()

    backup = (tmp_path / "pending.jsonl").read_text()
    assert callback(uri, tmp_path, sweep).replay_journal() == 0
    assert not (tmp_path / "pending.jsonl").exists()
    (tmp_path / "pending.jsonl").write_text(backup)  # the same journal replayed again: nothing doubles
    assert callback(uri, tmp_path, sweep).replay_journal() == 0

    runs = tracker.client.search_runs([tracker.experiment_id], f"tags.`{PARENT_TAG}` = '{sweep}'")
    assert sorted(run.data.tags[TRIAL_TAG] for run in runs) == ["t1", "t2"]
    t1 = next(run for run in runs if run.data.tags[TRIAL_TAG] == "t1")
    history = tracker.client.get_metric_history(t1.info.run_id, "train_loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5)]


def test_tune_never_waits_for_mlflow_and_the_writer_keeps_the_order(tmp_path, sqlite_sweep, monkeypatch):
    """Tune's event loop only queues; one writer thread applies. Here the store holds every update until
    the test lets it go (a tracking server that has not answered yet; bench/slow_tracking.py measures a
    real slow server)."""
    uri, _, sweep = sqlite_sweep
    runs = callback(uri, tmp_path, sweep)
    answer, applied, apply = threading.Event(), [], TrialRuns.apply

    def held(self, update):
        answer.wait(60)
        apply(self, update)
        applied.append((update["trial"], update.get("epoch")))

    monkeypatch.setattr(TrialRuns, "apply", held)
    for update in updates("t1", 2) + updates("t2", 1):
        runs.submit(update)  # returns though MLflow has answered nothing
    assert applied == []
    journal = tmp_path / "pending.jsonl"
    assert len(journal.read_text().splitlines()) == 5
    saved = pickle.dumps(runs)  # Tune checkpoints its callbacks meanwhile
    runs.submit({"kind": "sweep_end", "trial": "", "config": {}, "failed": 0})  # after Tune's last checkpoint
    # A driver killed now resumes with what the journal holds, the update after Tune's checkpoint included.
    assert pickle.loads(saved)._pending == updates("t1", 2) + updates("t2", 1) + [runs._pending[-1]]
    answer.set()
    assert runs.drain() == 0
    assert applied == [("t1", None), ("t1", 1), ("t1", 2), ("t2", None), ("t2", 1), ("", None)]
    assert not journal.exists()


def test_a_permanent_failure_is_recorded_and_skipped_not_blocking_the_rest(tmp_path, sqlite_sweep):
    uri, tracker, sweep = sqlite_sweep
    runs = callback(uri, tmp_path, sweep)
    bad = dict(updates("t1", 1)[1], metrics={"no spaces or ! allowed?": 1.0})  # MLflow rejects the name
    missing = {"kind": "complete", "trial": "t1", "config": {"lora_rank": 4}, "status": "TERMINATED",
               "best": {"value": 0.5, "epoch": 1, "checkpoint_path": str(tmp_path / "no-such-checkpoint")}}
    for update in [updates("t1", 1)[0], bad, missing, *updates("t2", 1)]:
        runs.submit(update)
    assert runs.drain() == 0
    assert not (tmp_path / "pending.jsonl").exists()  # nothing waits: the refused ones were skipped
    refused = failed_updates(tmp_path / "failed.jsonl")
    assert [entry["update"]["kind"] for entry in refused] == ["result", "complete"]
    assert all(entry["reason"] for entry in refused)
    t2 = tracker.client.search_runs([tracker.experiment_id], f"tags.`{TRIAL_TAG}` = 't2'")
    assert [m.step for m in tracker.client.get_metric_history(t2[0].info.run_id, "train_loss")] == [1]


def test_mlflow_globals_are_put_back_for_the_rest_of_the_process(tmp_path, monkeypatch):
    """Promotion and `models:/` downloads point MLflow's process-wide URIs at the sweep's store; after them
    the process (and the environment its subprocesses inherit) is as before: a leftover sent a later
    sweep's registrations to the first one's store (seen in the suite, 2026-12-03)."""
    import mlflow

    from runner.tracking.client import mlflow_globals

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", "sqlite:///elsewhere.db")
    default = mlflow.get_tracking_uri()
    with mlflow_globals(f"sqlite:///{tmp_path / 'store.db'}"):
        assert mlflow.get_registry_uri() == mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'store.db'}"
    assert "MLFLOW_TRACKING_URI" not in os.environ and mlflow.get_tracking_uri() == default
    assert os.environ["MLFLOW_REGISTRY_URI"] == mlflow.get_registry_uri() == "sqlite:///elsewhere.db"


# --- concurrency ---------------------------------------------------------------------------------------

def sweep(gpu=0.0, cpu=1.0, max_concurrent=None) -> SweepConfig:
    return SweepConfig(name="s", trial=TrialConfig(), space={"lora_rank": Domain("choice", (4, 8))},
                       resources=ResourcesConfig(gpu=gpu, cpu=cpu), max_concurrent_trials=max_concurrent)


@pytest.mark.parametrize("resources, config, expected", [
    ({"CPU": 2}, sweep(cpu=1.9), 1),  # the quick-start: one trial at a time on 2 cores
    ({"CPU": 16}, sweep(cpu=1), 14),  # each trial: 1 CPU for its worker + 0.1 for its driver
    ({"CPU": 16, "GPU": 1}, sweep(gpu=0.25, cpu=2), 4),  # four packed on one card
    ({"CPU": 64, "GPU": 4}, sweep(gpu=1, cpu=4), 4),
    ({"CPU": 64, "GPU": 4}, sweep(gpu=0.5, cpu=4, max_concurrent=3), 3),
])
def test_concurrency_from_cluster_resources(resources, config, expected):
    assert concurrency(config, resources) == expected


@pytest.mark.parametrize("resources, config, message", [
    ({"CPU": 16}, sweep(gpu=0.5), "cluster has 0 GPUs"),
    ({"CPU": 1}, sweep(cpu=1), "cluster has 1 CPUs"),
])
def test_concurrency_refuses_what_the_cluster_cannot_run(resources, config, message):
    with pytest.raises(UserError, match=message):
        concurrency(config, resources)


def test_trial_drivers_run_on_the_head_so_its_cpus_bound_the_concurrency():
    gpus = {"CPU": 64, "GPU": 16}  # 16 GPU workers, four trials on each card
    assert concurrency(sweep(gpu=0.25, cpu=1), gpus) == 58  # CPU-bound: 64 / 1.1
    assert concurrency(sweep(gpu=0.25, cpu=1), gpus, head_cpus=4) == 40  # 0.1 CPU each on the head
    with pytest.raises(UserError, match="head node has 0 CPUs; each trial's Tune function runs there"):
        concurrency(sweep(gpu=0.25, cpu=1), gpus, head_cpus=0)


# --- seeded sampling -----------------------------------------------------------------------------------

def drawn(config: SweepConfig) -> list[dict]:
    """The trial configs the sweep's own search algorithm draws (no cluster needed to ask it)."""
    from runner.sweep.tuner import param_space, search_algorithm

    searcher = search_algorithm(config, max_concurrent=100)  # no trial ends here: let all be drawn
    searcher.add_configurations({"s": {"run": lambda _: None, "config": param_space(config),
                                       "num_samples": config.num_samples}})
    configs = []
    while (trial := searcher.next_trial()) is not None:
        configs.append(trial.config)
    return configs


def test_the_same_space_and_seed_draw_the_same_trials():
    from runner.config import load_sweep

    space = REPO / "search_spaces" / "quickstart.yaml"
    first, again = drawn(load_sweep(space)), drawn(load_sweep(space))
    assert len(first) == 4 and first == again
    assert drawn(load_sweep(space, ["trial.seed=1"])) != first  # the seed is what fixes them


# --- the test scorer of a sweep's tail (runner/sweep/tail.py) -------------------------------------------

@pytest.mark.parametrize("overrides, warm", [
    (["resources.gpu=0.25"], True),  # the space varies rank and learning rate: the base model scores alike
    ([], False),  # trials on CPU: the scorer runs in the driver after the sweep (no torch there meanwhile)
    (["resources.gpu=0.25", "space={precision: {choice: [int8, nf4]}}"], False),  # another base model each
    (["resources.gpu=0.25", "space={lora_targets: {choice: ['q,v', 'q,v,query,value']}}"], False),  # features
])
def test_the_scorer_loads_in_the_tail_only_where_every_trial_scores_the_base_model_alike(overrides, warm):
    from runner.config import load_sweep
    from runner.sweep.tail import warm_scorer

    config = load_sweep(REPO / "search_spaces" / "quickstart.yaml", overrides)
    assert (warm_scorer(config) is not None) == warm


def test_a_champion_uses_the_tails_scorer_only_if_it_scores_like_it():
    from runner.eval.held_out import same_scores

    base = TrialConfig(lora_rank=8, n_samples=100)
    assert same_scores(TrialConfig(lora_rank=32, n_samples=800, learning_rate=3e-3), base)
    assert not same_scores(TrialConfig(lora_rank=8, n_samples=100, eval_batch_size=64), base)  # batches pad alike
    assert not same_scores(TrialConfig(lora_rank=8, n_samples=100, lora_targets="q,v,query"), base)  # its features


# --- promotion rules -----------------------------------------------------------------------------------

OURS = {"test_exact_match": "0.80", "test_fingerprint": "abc", "task": "easy_vqa"}


@pytest.mark.parametrize("champion, theirs, mode, move, message", [
    (None, None, "max", True, "champion -> v2"),  # no champion yet
    ("1", {**OURS, "test_exact_match": "0.70"}, "max", True, "champion -> v2"),  # better
    ("1", {**OURS, "test_exact_match": "0.90"}, "max", False, "does not beat champion v1"),  # worse
    ("1", dict(OURS), "max", False, "does not beat"),  # a tie keeps the champion
    ("1", {**OURS, "test_exact_match": "0.10", "test_fingerprint": "xyz"}, "max", False, "different test set"),
    ("2", dict(OURS), "max", False, "already the champion"),
    ("1", {**OURS, "test_exact_match": "0.90"}, "min", True, "champion -> v2"),  # lower is better
    ("1", {"test_fingerprint": "abc"}, "max", False, "does not beat"),  # an unscored champion stays
])
def test_every_promotion_rule(champion, theirs, mode, move, message):
    decision = decide("2", OURS, champion, theirs, "test_exact_match", mode)
    assert decision.move is move and message in decision.message, decision


def test_an_unscored_version_never_becomes_champion():
    decision = decide("2", {"test_fingerprint": "abc"}, None, None, "test_exact_match", "max")
    assert not decision.move and "no test_exact_match" in decision.message


# --- code version --------------------------------------------------------------------------------------

def test_code_version_is_the_projects_own_commit_at_the_root_of_its_checkout():
    expected = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=REPO,
                              check=True).stdout.strip()
    assert code_version(REPO / "runner").removesuffix("-dirty") == expected


def test_code_version_inside_another_repository_is_the_package_version(tmp_path):
    from importlib.metadata import version

    outer = tmp_path / "outer"
    (outer / "vendor" / "project").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    subprocess.run(["git", "-C", str(outer), "-c", "user.email=a@b", "-c", "user.name=a", "commit", "-q",
                    "--allow-empty", "-m", "outer"], check=True)
    package = shutil.copytree(REPO / "runner", outer / "vendor" / "project" / "runner",
                              ignore=shutil.ignore_patterns("artifact", "__pycache__"))
    assert code_version(Path(package)) == version("blip2-lora-runner")


# --- checkpoint format ---------------------------------------------------------------------------------

def test_resume_compares_only_what_changes_training(tmp_path):
    from runner.train import checkpoint

    saved = checkpoint.Checkpoint(tmp_path, TrialConfig(lora_rank=8), 1, [], {})
    checkpoint.check_resumable(saved, TrialConfig(lora_rank=8, eval_batch_size=7, device="cpu"))  # fine
    with pytest.raises(UserError, match=r"different config \(learning_rate\)"):
        checkpoint.check_resumable(saved, TrialConfig(lora_rank=8, learning_rate=0.5))


def test_an_incomplete_or_foreign_checkpoint_is_a_clear_error(tmp_path):
    from runner.train import checkpoint

    (tmp_path / "adapter").mkdir()
    (tmp_path / "trial_config.json").write_text("{}")
    with pytest.raises(UserError, match="missing metrics.json, trainer_state.pt, checkpoint.json"):
        checkpoint.load(tmp_path)
    for name in ("metrics.json", "trainer_state.pt"):
        (tmp_path / name).write_text("[]")
    for name in checkpoint.ADAPTER_FILES:
        (tmp_path / "adapter" / name).write_text("{}")
    (tmp_path / "checkpoint.json").write_text(json.dumps({"format_version": 99, "epoch": 1, "data": {}}))
    with pytest.raises(UserError, match="checkpoint format 99"):
        checkpoint.load(tmp_path)


def test_an_old_checkpoint_with_an_unknown_field_still_loads(tmp_path):
    from runner.train import checkpoint

    for name in checkpoint.ADAPTER_FILES:
        (tmp_path / "adapter").mkdir(exist_ok=True)
        (tmp_path / "adapter" / name).write_text("{}")
    (tmp_path / "metrics.json").write_text("[]")
    (tmp_path / "trainer_state.pt").write_text("")
    (tmp_path / "trial_config.json").write_text(json.dumps({**TrialConfig().to_dict(), "retired_field": 3}))
    (tmp_path / "checkpoint.json").write_text(json.dumps({"format_version": checkpoint.FORMAT_VERSION,
                                                          "epoch": 2, "data": {"train_fingerprint": "f"}}))
    loaded = checkpoint.load(tmp_path)
    assert loaded.epoch == 2 and loaded.config == TrialConfig()


def test_a_checkpoint_from_before_lora_targets_resumes_with_its_default_only(tmp_path):
    from runner.train import checkpoint

    for name in checkpoint.ADAPTER_FILES:
        (tmp_path / "adapter").mkdir(exist_ok=True)
        (tmp_path / "adapter" / name).write_text("{}")
    (tmp_path / "metrics.json").write_text("[]")
    (tmp_path / "trainer_state.pt").write_text("")
    old = {key: value for key, value in TrialConfig().to_dict().items() if key != "lora_targets"}
    (tmp_path / "trial_config.json").write_text(json.dumps(old))
    (tmp_path / "checkpoint.json").write_text(json.dumps({"format_version": checkpoint.FORMAT_VERSION,
                                                          "epoch": 1, "data": {}}))
    saved = checkpoint.load(tmp_path)
    checkpoint.check_resumable(saved, TrialConfig(lora_targets="q,v"))  # what it trained: today's default
    with pytest.raises(UserError, match=r"different config \(lora_targets\)"):
        checkpoint.check_resumable(saved, TrialConfig(lora_targets="q,k,v,o"))


# --- the shipped tiny model ----------------------------------------------------------------------------

def test_the_shipped_tiny_model_matches_the_current_recipe():
    from runner.tiny import ARTIFACT, model_dir, stale_reasons

    assert model_dir() == ARTIFACT
    manifest = json.loads((ARTIFACT / "TINY_MODEL.json").read_text())
    assert stale_reasons(manifest) == []
    assert {"model.safetensors", "tokenizer.json", "config.json"} <= manifest["files"].keys()


def test_a_stale_or_damaged_tiny_artifact_is_detected():
    from runner.tiny import ARTIFACT, stale_reasons

    manifest = json.loads((ARTIFACT / "TINY_MODEL.json").read_text())
    assert "built as version 1" in stale_reasons({**manifest, "tiny_version": "1"})[0]
    changed = {**manifest, "recipe": {**manifest["recipe"], "stage1_steps": 1}}
    assert stale_reasons(changed) == ["built with other recipe settings"]
    damaged = {**manifest, "files": {**manifest["files"], "model.safetensors": "0" * 64}}
    assert stale_reasons(damaged) == ["model.safetensors differs from the build"]



@pytest.mark.parametrize("share, cap_gib, expected_gib", [
    (1.0, None, 100), (0.25, None, 35), (0.25, 20, 20), (1.0, 200, 100), (0.5, None, 70)])
def test_preflight_plans_with_the_trials_own_share_of_the_card(share, cap_gib, expected_gib):
    """A 140 GiB card with 100 GiB free: a trial given a quarter of it plans with 35 GiB, not 100."""
    from runner.model.preflight import CUDA_CONTEXT_GIB, GIB, available_gib

    assert available_gib(100 * GIB, 140 * GIB, share, cap_gib) == pytest.approx(expected_gib - CUDA_CONTEXT_GIB)


def test_a_second_local_sweep_is_refused_naming_the_one_that_holds_the_machine(tmp_path):
    """A real second process holds the machine's local-cluster lock (as a running sweep does); a sweep started
    meanwhile exits 2 at once, naming it and its address, and writes nothing."""
    import sys

    from click.testing import CliRunner

    from runner.cli import main
    from tests.conftest import SPACE

    env = {**os.environ, "RUNNER_CACHE": str(tmp_path / "cache")}
    holder = subprocess.Popen([sys.executable, "-c", "import time; from runner.sweep.tuner import LocalClusterHold; "
                               "hold = LocalClusterHold('first'); hold.announce('127.0.0.1:6390'); print('held', flush=True); "
                               "time.sleep(120)"], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(main, ["tune", SPACE, "name=second", f"storage_path={tmp_path / 'ray'}",
                                           f"tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"], env=env)
        assert result.exit_code == 2, result.output
        assert (f"sweep 'first' (pid {holder.pid}) is running a local Ray cluster on this machine; wait for it to "
                "end, or join its cluster with --address 127.0.0.1:6390") in result.output
        assert not (tmp_path / "ray").exists() and not (tmp_path / "mlflow.db").exists()
    finally:
        holder.kill()
        holder.wait()
    from runner.sweep.tuner import LocalClusterHold

    with LocalClusterHold("third"):  # the holder's end released the machine
        pass


def test_a_sweeps_ray_processes_are_told_their_own_cluster(monkeypatch):
    """RAY_ADDRESS for the job's runtime env: the address joined, or a local head's port chosen before it starts
    (the placement-group cleaner otherwise fails when another Ray runs on the machine; docs/TRAPS.md)."""
    monkeypatch.delenv("RAY_GCS_SERVER_PORT", raising=False)
    assert own_cluster_env("10.0.0.7:6379") == {"RAY_ADDRESS": "10.0.0.7:6379"}
    assert own_cluster_env("auto") == {} and own_cluster_env("ray://head:10001") == {}
    local = own_cluster_env(None)["RAY_ADDRESS"]
    assert local.endswith(":" + os.environ["RAY_GCS_SERVER_PORT"]) and int(os.environ["RAY_GCS_SERVER_PORT"]) > 0


# --- a full storage disk (a real tmpfs: root only) -------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A mounted tmpfs of the size the test asks for: `small_disk(megabytes)` -> its path."""
    from contextlib import ExitStack

    from tests.conftest import small_disk as mount

    with ExitStack() as stack:
        def make(megabytes: int) -> Path:
            disk = stack.enter_context(mount(tmp_path / f"disk{megabytes}", megabytes))
            if not disk["mounted"]:
                pytest.skip(f"cannot mount a tmpfs here ({disk['why']}): the full-disk tests need root")
            return disk["path"]

        yield make


def test_a_disk_without_room_for_the_sweeps_reserve_is_refused_before_anything_is_written(small_disk):
    from runner.config import load_sweep
    from runner.sweep import storage

    disk = small_disk(8)
    config = load_sweep(str(REPO / "search_spaces" / "quickstart.yaml"), [f"storage_path={disk / 'ray'}"])
    with pytest.raises(UserError, match=rf"storage_path: {disk / 'ray'} has 8 MB free; a sweep keeps 16 MB"):
        storage.reserve(config)
    assert not config.state_dir.exists()


def test_the_guard_releases_the_reserve_and_stops_tune_once_the_disk_is_full(small_disk):
    import signal

    from runner.config import load_sweep
    from runner.errors import ServiceError
    from runner.sweep import storage

    disk = small_disk(20)
    config = load_sweep(str(REPO / "search_spaces" / "quickstart.yaml"), [f"storage_path={disk / 'ray'}"])
    reserve = storage.reserve(config)
    guard, stops = storage.StorageGuard(reserve), []
    previous = signal.signal(signal.SIGUSR1, lambda *_: stops.append("SIGUSR1"))  # Tune's stop signal
    try:
        guard.on_step_begin(0, [])
        assert stops == [] and reserve.exists()  # 4 MB free: room for the next checkpoints
        storage.check_not_stopped(config, reserve, "runner tune space.yaml")
        fill_disk(disk)
        guard._checked = 0.0  # the next look (once a second)
        guard.on_step_begin(1, [])
        assert stops == ["SIGUSR1"] and not reserve.exists()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    with pytest.raises(ServiceError, match=rf"no space left on device in {disk / 'ray'} \(16 MB free now.*"
                                           r"run `runner tune space.yaml --resume`"):
        storage.check_not_stopped(config, reserve, "runner tune space.yaml")


def test_a_journal_that_a_full_disk_cannot_take_waits_in_memory_and_reaches_mlflow(small_disk, tmp_path,
                                                                                   sqlite_sweep, caplog):
    uri, tracker, sweep = sqlite_sweep
    disk = small_disk(1)
    fill_disk(disk)
    runs = TrialRuns(uri, "units", sweep, "val_exact_match", "max", TrialConfig().to_dict(), str(disk),
                     disk / "pending.jsonl", tmp_path / "failed.jsonl")
    for update in updates("t1", 2):
        runs.submit(update)  # Tune's thread: no exception though the journal cannot be written
    assert runs.drain() == 0
    assert "cannot write the MLflow journal" in caplog.text and "No space left on device" in caplog.text
    (run,) = tracker.client.search_runs([tracker.experiment_id], f"tags.`{TRIAL_TAG}` = 't1'")
    assert sorted(m.step for m in tracker.client.get_metric_history(run.info.run_id, "train_loss")) == [1, 2]


def test_the_sweeps_log_file_on_a_full_disk_says_so_once_not_a_traceback_per_record(small_disk, capsys):
    import logging

    from runner.console import SweepLog

    disk = small_disk(1)
    handler = SweepLog(disk / "runner.log")
    fill_disk(disk)
    logger = logging.getLogger("runner.test-full-disk")
    logger.addHandler(handler)
    try:
        for n in range(3):
            logger.warning("record %d", n)
    finally:
        logger.removeHandler(handler)
        (disk / "filler").unlink()  # space again (the guard's released reserve): the file closes
        handler.close()
    err = capsys.readouterr().err
    assert err.count("cannot write the sweep's log") == 1 and "No space left on device" in err, err
    assert "Traceback" not in err and "Logging error" not in err, err
