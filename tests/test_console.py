"""What a person sees, without Ray or a server: the harmless list stops only what it names (a real warning of
the same kind still shows), the console keeps our lines and everyone's warnings, the live view's rows, the
MLflow links, and a trial run's dataset inputs, source and logged adapter model in a real SQLite store."""

import logging
import warnings
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import pytest
from mlflow.entities import LoggedModelStatus

from runner import console
from runner.config import TrialConfig
from runner.sweep.progress import SweepProgress
from runner.tracking.callback import ADAPTER_MODEL, TrialRuns, log_adapter_model
from runner.tracking.client import PARENT_TAG, Tracker, ui_links
from runner.tracking.datasets import DIGEST_LIMIT, data_source, describe
from tasks import get_task


def test_known_harmless_warnings_are_stopped_and_a_real_one_still_shows():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        console.stop_harmless()
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("MatMul8bitLt: inputs will be cast from torch.float32 to float16", UserWarning)
        warnings.warn("`use_cache` is deprecated and will be removed in v6.", FutureWarning)  # not on the list
        warnings.warn("`is_gradient_checkpointing` is deprecated", DeprecationWarning)  # same text, other kind
        # MLflow colours this one: the filter takes it with and without the escape code.
        warnings.warn("\x1b[1;33mAn input example was not provided when logging the model. To ensure", UserWarning)
        warnings.warn("An input example was not provided when logging the model.", UserWarning)
        warnings.warn("An input example of 3 rows was truncated", UserWarning)  # something else MLflow says
    assert [(w.category, str(w.message)) for w in caught] == [
        (FutureWarning, "`use_cache` is deprecated and will be removed in v6."),
        (DeprecationWarning, "`is_gradient_checkpointing` is deprecated"),
        (UserWarning, "An input example of 3 rows was truncated")]


def test_known_harmless_records_are_stopped_at_their_logger_only(caplog):
    console.stop_harmless()
    console.stop_harmless()  # twice (CLI and worker hook in one process): one filter, not two
    bnb = logging.getLogger("bitsandbytes.autograd._functions")
    assert sum(isinstance(f, console.HarmlessRecords) for f in bnb.filters) == 1
    with caplog.at_level(logging.WARNING):
        bnb.warning("MatMul8bitLt: inputs will be cast from %s to float16 during quantization", "torch.float32")
        bnb.warning("MatMul8bitLt: an outlier threshold of %s is unusual", 99)  # something else it says
        logging.getLogger("runner.elsewhere").warning("MatMul8bitLt: inputs will be cast from x")  # another logger
    assert [r.getMessage() for r in caplog.records] == ["MatMul8bitLt: an outlier threshold of 99 is unusual",
                                                        "MatMul8bitLt: inputs will be cast from x"]


@pytest.mark.parametrize("name, level, shown", [
    ("runner.sweep.tuner", logging.INFO, True), ("runner", logging.DEBUG, False),
    ("mlflow.store.db.utils", logging.INFO, False), ("ray.tune", logging.WARNING, True),
    ("tasks.common", logging.INFO, False), ("urllib3", logging.ERROR, True)])
def test_the_console_keeps_our_lines_and_every_warning(name, level, shown):
    record = logging.LogRecord(name, level, __file__, 1, "message", None, None)
    assert console.Console().filter(record) is shown


def test_the_live_view_prints_one_aligned_row_per_epoch_and_a_final_status():
    lines = []
    view = SweepProgress(["lora_rank", "learning_rate"], "val_exact_match", 3, say=lines.append)
    trial = SimpleNamespace(trial_id="f9719_00000", config={"lora_rank": 8, "learning_rate": 0.00312345},
                            last_result={"epoch": 1, "val_exact_match": 0.61, "val_shuffled_exact_match": 0.49,
                                         "train_loss": 1.2924, "train_samples_per_second": 62.07})
    view.row(trial, trial.last_result, "RUNNING")
    view.on_trial_complete(0, [trial], trial)
    header, epoch, final = lines
    assert header.split() == ["trial", "lora_rank", "learning_rate", "epoch", "val_exact_match", "shuffled",
                              "EM", "loss", "samples/s", "status"]
    assert epoch.split() == ["f9719_00000", "8", "0.003123", "1/3", "0.61", "0.49", "1.292", "62.07", "RUNNING"]
    assert final.split() == ["f9719_00000", "8", "0.003123", "1/3", "STOPPED_EARLY"]  # ASHA stopped it
    assert header.index("status") == epoch.index("RUNNING")  # columns line up


def test_links_open_the_trials_not_the_genai_overview():
    links = ui_links("http://127.0.0.1:5000", "7", "abc123", "val_exact_match")
    trials = unquote(links["trials"])
    assert trials.startswith("http://127.0.0.1:5000/#/experiments/7/runs?workflowType=machine_learning&")
    assert f"searchFilter=tags.`{PARENT_TAG}` = 'abc123'" in trials  # filtered: the trials show, not nested
    assert "orderByKey=metrics.`best_val_exact_match`&orderByAsc=false" in trials
    assert links["sweep run"] == "http://127.0.0.1:5000/#/experiments/7/runs/abc123"


def test_a_tasks_data_source_is_a_local_path_or_a_pinned_hub_id(tmp_path):
    easy, rad = get_task("easy_vqa"), get_task("vqa_rad")
    assert Path(data_source(easy, None)["path"]).is_dir()  # the easy_vqa package's data
    assert data_source(rad, None) == {"hub": "flaviagiammarino/vqa-rad", "revision": "main"}
    assert data_source(rad, "someone/copy@abc1234") == {"hub": "someone/copy", "revision": "abc1234"}
    assert data_source(rad, str(tmp_path)) == {"path": str(tmp_path.resolve())}


def test_a_trial_run_shows_its_data_source_and_adapter_model_in_mlflow(tmp_path):
    """The runs table's Dataset, Source and Models columns, from a real SQLite store; a replayed update
    logs nothing twice."""
    task = get_task("easy_vqa")
    datasets = describe(task, None)
    assert [d["digest"] for d in datasets] == [task.load_split(s).fingerprint[:DIGEST_LIMIT]
                                               for s in ("train", "validation")]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "units")
    sweep = tracker.start_sweep("s", {"name": "s"}, "runner tune", tags={})
    checkpoint = tmp_path / "epoch-001"  # the files the callback looks for in a trial's checkpoint
    (checkpoint / "adapter").mkdir(parents=True)
    for name in ("adapter_config.json", "adapter_model.safetensors", "../checkpoint.json"):
        (checkpoint / "adapter" / name).write_text("{}")
    runs = TrialRuns(uri, "units", sweep, "val_exact_match", "max", TrialConfig().to_dict(), str(tmp_path),
                     tmp_path / "pending.jsonl", tmp_path / "failed.jsonl", datasets)
    start = {"kind": "start", "trial": "t1", "config": {"lora_rank": 4}}
    complete = {"kind": "complete", "trial": "t1", "config": {"lora_rank": 4}, "status": "TERMINATED",
                "best": {"value": 0.5, "epoch": 1, "checkpoint_path": str(checkpoint)}}
    runs.submit(start)
    runs.submit(complete)
    assert runs.drain() == 0
    run_id = runs._runs["t1"]
    log_adapter_model(tracker.client, tracker.experiment_id, run_id, checkpoint, 1)  # as a replay would
    assert not (tmp_path / "failed.jsonl").exists()

    run = tracker.client.get_run(run_id)
    inputs = [(i.dataset.name, i.dataset.digest, i.dataset.source_type, i.tags[0].value)
              for i in run.inputs.dataset_inputs]
    assert inputs == [("easy_vqa train", datasets[0]["digest"], "local", "training"),
                      ("easy_vqa validation", datasets[1]["digest"], "local", "validation")]
    assert run.data.tags["mlflow.source.name"].startswith("runner ")
    assert run.data.tags["mlflow.source.name"].endswith(run.data.tags["runner.code_version"])
    models = tracker.client.search_logged_models([tracker.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert [(m.name, m.status) for m in models] == [(ADAPTER_MODEL, LoggedModelStatus.READY)]
    assert [o.model_id for o in run.outputs.model_outputs] == [models[0].model_id]
    files = {Path(a.path).name for a in tracker.client.list_logged_model_artifacts(models[0].model_id)}
    assert files == {"adapter_config.json", "adapter_model.safetensors"}
