"""The product's main job, end to end through the real CLI: a real local Ray cluster runs the
quick-start space (the README's main command), a real MLflow store (SQLite in a temp folder) records it,
the registry promotes.

Two sweeps share one store (the `store` fixture), in order: the quick-start (the first champion), then
a weak one (registered, worse on the same test questions: the alias stays). The promotion rules one by
one are unit tests (tests/test_units.py); the same space and seed drawing the same trials is too, and
the same trial giving the same numbers is tests/test_pinned.py.
"""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli import main
from tests.conftest import MODEL, REPO, SPACE, STORE_TEST_QUESTIONS

pytestmark = pytest.mark.slow


def sweep_runs(store, name):
    """The sweep's parent run and its trial runs (its stage runs are children too, of another kind)."""
    client = store["client"]
    experiment = client.get_experiment_by_name("quickstart")
    parent = client.search_runs([experiment.experiment_id], f"tags.`runner.sweep` = '{name}'")
    assert len(parent) == 1
    children = client.search_runs([experiment.experiment_id],
                                  f"tags.`mlflow.parentRunId` = '{parent[0].info.run_id}'")
    assert {run.data.tags["runner.kind"] for run in children} == {"trial", "stage"}
    return parent[0], [run for run in children if run.data.tags["runner.kind"] == "trial"]


def test_every_trial_is_a_child_run_with_its_reported_metrics(store):
    parent, children = sweep_runs(store, "quickstart")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["space.lora_rank.choice"] == "[4, 8, 16]"
    assert len(children) == 2
    for run in children:
        assert {"lora_rank", "learning_rate", "n_samples"} <= run.data.params.keys()
        assert run.info.status == "FINISHED"
        # The best epoch's checkpoint is an artifact; its metrics.json is what the worker reported.
        reported = json.loads(Path(store["client"].download_artifacts(run.info.run_id, "checkpoint/metrics.json"))
                              .read_text())
        for epoch_metrics in reported:
            epoch = int(epoch_metrics["epoch"])
            for key in ("val_exact_match", "train_loss", "val_bleu1", "val_shuffled_exact_match"):
                history = {m.step: m.value for m in store["client"].get_metric_history(run.info.run_id, key)}
                assert history[epoch] == pytest.approx(epoch_metrics[key], rel=1e-12), (key, epoch)
        steps = [m.step for m in store["client"].get_metric_history(run.info.run_id, "train_loss")]
        assert len(steps) == len(set(steps))  # nothing logged twice


def test_asha_stopped_a_trial_and_best_beats_worst(store):
    _, children = sweep_runs(store, "quickstart")
    statuses = [run.data.tags["runner.trial_status"] for run in children]
    assert "STOPPED_EARLY" in statuses, statuses
    best = [run.data.metrics["best_val_exact_match"] for run in children]
    assert max(best) > min(best) + 0.05, best


def test_champion_moves_only_for_a_better_model(store):
    client = store["client"]
    versions = {int(v.version): v for v in client.search_model_versions(f"name = '{MODEL}'")}
    assert sorted(versions) == [1, 2]
    champion = client.get_model_version_by_alias(MODEL, "champion")
    assert str(champion.version) == "1"  # the quick-start; weak (v2) did not move it
    assert float(versions[2].tags["test_exact_match"]) < float(versions[1].tags["test_exact_match"])
    assert "v2 test_exact_match" in store["stdout"]["weak"] and "does not beat champion v1" in store["stdout"]["weak"]
    assert "promotion: champion -> v1" in store["stdout"]["quickstart"]
    lineage = versions[1].tags
    quickstart, children = sweep_runs(store, "quickstart")
    assert lineage["sweep_run_id"] == quickstart.info.run_id
    assert lineage["trial_run_id"] in {run.info.run_id for run in children}
    assert {"lora_rank", "learning_rate", "n_samples"} <= json.loads(lineage["trial_params"]).keys()
    assert lineage["base_model"] == "tiny" and len(lineage["train_fingerprint"]) == 64
    assert lineage["test_placement"].endswith("GPU none")  # a CPU sweep scores in its driver (a cluster: tests/test_node_loss.py)
    assert lineage["test_fingerprint"] == versions[2].tags["test_fingerprint"]  # same test questions
    # The champion sees the image: its test accuracy is far above the shuffled-image control.
    assert float(lineage["test_exact_match"]) > float(lineage["test_shuffled_exact_match"]) + 0.10


def invoke(*args: str):
    """The real CLI in-process (click's runner): the same code path, without a Python start and imports per
    call (a fresh process is tested where it matters: the champion loads in one, below)."""
    return CliRunner().invoke(main, list(args))


def test_promote_again_creates_no_second_version(store, monkeypatch):
    monkeypatch.chdir(store["root"])  # the report goes under the working folder, as for the sweep
    result = invoke("promote", SPACE, "name=quickstart", *store["common"])
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    assert "already the champion" in result.stdout
    assert len(store["client"].search_model_versions(f"name = '{MODEL}'")) == 2


LOAD_AND_SCORE = """
import io, json, sys
import mlflow, pandas as pd
from runner.eval import metrics
from runner.eval.evaluate import draw_samples
from tasks import get_task


uri, name, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
mlflow.set_tracking_uri(uri)
model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
trial = model.unwrap_python_model().trial
task = get_task(trial.task, data=trial.data, val_fraction=trial.val_fraction, seed=trial.seed)
test = task.load_split("test")
examples = draw_samples(test.examples, n, trial.seed, "test")

def png(image):  # images travel as PNG bytes, as a client would send them
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()

frame = pd.DataFrame({"image": [png(test.images[e.image_key]) for e in examples],
                      "question": [e.question for e in examples]})
assert model.metadata.get_input_schema().input_names() == ["image", "question"]  # the stated signature
answers = model.predict(frame)
print(json.dumps(metrics.score(answers, [task.normalize_answer(e.answer) for e in examples],
                               [task.is_closed(e) for e in examples])))
"""


def test_champion_loads_in_a_fresh_process_and_reproduces_its_test_metric(store):
    champion = store["client"].get_model_version_by_alias(MODEL, "champion")
    result = subprocess.run([sys.executable, "-c", LOAD_AND_SCORE, store["uri"], MODEL, str(STORE_TEST_QUESTIONS)],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert scores["exact_match"] == pytest.approx(float(champion.tags["test_exact_match"]), abs=1e-9)
    assert not math.isnan(scores["closed_accuracy"])


@pytest.mark.parametrize("source", ["models:/{model}@champion", "runs:/{trial_run_id}"])
def test_eval_scores_the_champion_from_the_registry_or_its_run(store, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    champion = store["client"].get_model_version_by_alias(MODEL, "champion")
    adapter = source.format(model=MODEL, trial_run_id=champion.tags["trial_run_id"])
    predictions = tmp_path / "predictions.csv"
    result = invoke("eval", "--adapter", adapter, "--tracking-uri", store["uri"], "--split", "test",
                    "--max-eval-examples", str(STORE_TEST_QUESTIONS), "--predictions", str(predictions))
    assert result.exit_code == 0, (result.output[-3000:], result.exception)
    scores = json.loads(result.stdout[result.stdout.index("{"):])
    assert scores["exact_match"] == pytest.approx(float(champion.tags["test_exact_match"]), abs=1e-9)
    assert len(predictions.read_text().splitlines()) == STORE_TEST_QUESTIONS + 1  # header + one row per question
    assert list(tmp_path.iterdir()) == [predictions]  # nothing else in the user's folder (MLflow's default store)
