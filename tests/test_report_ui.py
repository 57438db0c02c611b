"""The comparison a person sees: the markdown report and figures (regenerated from MLflow alone), and
the MLflow UI in a real headless Chromium against a real `mlflow server` on loopback."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from tests.conftest import MODEL, SPACE, Collected, cli_process, free_port, run_cli

pytestmark = pytest.mark.slow  # reads the store sweeps, starts a server and a browser


def test_report_numbers_equal_mlflow_and_figures_are_real(store, tmp_path):
    out = tmp_path / "report"
    # By name, from MLflow alone: no space file, no Ray state.
    result = run_cli("report", "quickstart", "--tracking-uri", store["uri"], "--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    text = (out / "report.md").read_text()
    client = store["client"]
    experiment = client.get_experiment_by_name("quickstart")
    parent = client.search_runs([experiment.experiment_id], "tags.`runner.sweep` = 'quickstart'")[0]
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    trials = [r for r in children if r.data.tags["runner.kind"] == "trial"]
    stages = {r.data.tags["runner.stage"]: r for r in children if r.data.tags["runner.kind"] == "stage"}
    assert set(stages) == {"zero-shot", "one-shot"}
    for run in trials:  # every trial row carries its MLflow best metric
        row = next(line for line in text.splitlines() if line.startswith(f"| {run.data.tags['runner.trial_id']} |"))
        assert f"| {run.data.metrics['best_val_exact_match']:.4g} |" in row
    for name, run in stages.items():
        row = next(line for line in text.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[1] == f"{100 * run.data.metrics['test_bleu1']:.2f}"
        assert cells[3] == f"{100 * run.data.metrics['test_exact_match']:.2f}"
    best = max((r for r in trials if "test_exact_match" in r.data.metrics), key=lambda r: r.data.metrics["test_exact_match"])
    fine_tuned = next(line for line in text.splitlines() if line.startswith("| fine-tuned"))
    assert f"| {100 * best.data.metrics['test_exact_match']:.2f} |" in fine_tuned
    # Fine-tuning helps: the fine-tuned stage beats zero-shot on exact match.
    assert best.data.metrics["test_exact_match"] >= stages["zero-shot"].data.metrics["test_exact_match"]
    # easy_vqa is none of Med-PaLM M's datasets: no published rows beside ours (tests/test_report_refs.py has them).
    assert "None shown" in text and "Med-PaLM M 562B" not in text and "task `easy_vqa`" in text
    for name in ("params.png", "curves.png", "stages.png", "closed_open.png"):
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.size[0] > 400 and len(image.convert("RGB").getcolors(1 << 20)) > 20, name
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "report")}
    assert {"report/report.md", "report/stages.png"} <= artifacts


@pytest.fixture(scope="module")
def server(store):
    """`runner ui` over the store the sweeps wrote (a real `mlflow ui` on loopback) and the links it printed."""
    port = free_port()
    # As a user would: the space file and the overrides the sweep ran with find its store and the sweep.
    process = cli_process("ui", SPACE, "name=quickstart", *store["common"], "--port", str(port), cwd=store["root"])
    output = Collected(process.stdout)
    try:
        deadline = time.time() + 240
        while "sweep run:" not in output.text() and process.poll() is None and time.time() < deadline:
            time.sleep(0.5)
        links = dict(re.findall(r"^  (trials|sweep run): (\S+)$", output.text(), re.M))
        assert set(links) == {"trials", "sweep run"}, output.text()[-2000:]
        yield SimpleNamespace(base=f"http://127.0.0.1:{port}", links=links, output=output)
    finally:
        process.send_signal(signal.SIGTERM)  # as `kill` (or Ctrl-C): runner ui stops mlflow ui and its workers
        process.wait(60)


def test_the_quick_start_prints_the_sweep_not_the_libraries(store):
    """The README's main command (smaller): a short console that a person reads, the full log on disk."""
    text = store["stdout"]["quickstart"] + store["stderr"]["quickstart"]
    lines = text.splitlines()
    assert len(lines) <= 60, text
    rows = [line for line in lines if re.match(r"\S+_0000\d\s.*\s\d/2\s.*RUNNING$", line)]
    # Every trial, each epoch it ran: two for the first, one for the second (ASHA stopped it: tests/test_sweep.py).
    assert len({row.split()[0] for row in rows}) == 2 and len(rows) == 3, text
    for wanted in ("promotion: champion -> v1", "stage (test, %)", "zero-shot", "fine-tuned (best trial)",
                   "trials: http://127.0.0.1:5000/#/experiments/", "held now:"):
        assert wanted in text, (wanted, text)
    for noise in ("Checkpoint successfully created", "Reporting training result", "Downloading artifacts",
                  "FutureWarning", "kernels-community", "Loading weights", "PreemptionWatcher",
                  "Trial status:", "Add type hints", "Creating initial MLflow database tables"):
        assert noise not in text, (noise, text)
    log = (store["root"] / "ray" / "quickstart" / "runner.log").read_text()
    assert "sweep quickstart:" in log  # the full log, in the sweep's folder


def api(base: str, path: str, body: dict | None = None) -> dict:
    request = urllib.request.Request(f"{base}/api/2.0/mlflow/{path}", method="POST" if body else "GET",
                                     data=json.dumps(body).encode() if body else None,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_server_rest_api_shows_the_run_tree_and_champion(server):
    experiment = api(server.base, "experiments/get-by-name?experiment_name=quickstart")["experiment"]
    runs = api(server.base, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 1000})["runs"]
    tags = [{t["key"]: t["value"] for t in run["data"].get("tags", [])} for run in runs]
    parent = next(run for run, t in zip(runs, tags) if t.get("runner.sweep") == "quickstart")
    children = [(run, t) for run, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent["info"]["run_id"]]
    trials = [run for run, t in children if t["runner.kind"] == "trial"]
    assert len(trials) == 2
    for run in trials:
        assert {p["key"] for p in run["data"]["params"]} >= {"lora_rank", "learning_rate", "n_samples"}
        assert "val_exact_match" in {m["key"] for m in run["data"]["metrics"]}
    alias = api(server.base, f"registered-models/alias?name={MODEL}&alias=champion")["model_version"]
    assert alias["run_id"] in {run["info"]["run_id"] for run in trials}


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("CI must install Debian's chromium (see .ci/run)")
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    return found


def render(url: str, tmp_path: Path, screenshot: Path | None = None) -> str:
    """Load `url` in headless Chromium, let the page's JavaScript run, return the DOM."""
    flags = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=2000,1000", "--virtual-time-budget=30000"]
    dom = subprocess.run([*flags, "--dump-dom", url], capture_output=True, text=True, timeout=180).stdout
    if screenshot is not None:
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
        subprocess.run([*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=180)
    return dom


def test_the_printed_link_opens_the_sweeps_trials_with_data_source_and_models(server, store, tmp_path):
    client = store["client"]
    experiment = client.get_experiment_by_name("quickstart")
    sweep = client.search_runs([experiment.experiment_id], "tags.`runner.sweep` = 'quickstart'")[0]
    trials = client.search_runs([experiment.experiment_id], "tags.`runner.kind` = 'trial' and "
                                f"tags.`runner.sweep_run_id` = '{sweep.info.run_id}'")
    shots = Path(os.environ.get("RUNNER_SCREENSHOTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)

    runs_page = render(server.links["trials"], tmp_path / "a", shots / "mlflow-runs.png")
    assert "Detect Issues" not in runs_page and "Model training" in runs_page  # not MLflow's GenAI overview
    for run in trials:  # the trials themselves, listed (not collapsed under their sweep)
        assert run.info.run_name in runs_page
    assert "easy_vqa train" in runs_page  # Dataset column
    assert f"runner {sweep.data.tags['runner.code_version']}" in runs_page  # Source column
    assert re.search(r">\s*adapter\s*<", runs_page)  # Models column: each trial's logged adapter

    assert server.links["sweep run"].endswith(f"/runs/{sweep.info.run_id}")

    ids = json.dumps([r.info.run_id for r in trials])
    compare = (f"{server.base}/#/compare-runs?runs={urllib.parse.quote(ids)}"
               f"&experiments={urllib.parse.quote(json.dumps([experiment.experiment_id]))}")
    compare_page = render(compare, tmp_path / "b", shots / "mlflow-compare.png")
    for run in trials:
        assert run.info.run_name in compare_page
    assert "lora_rank" in compare_page and "val_exact_match" in compare_page
    for name in ("mlflow-runs.png", "mlflow-compare.png"):
        with Image.open(shots / name) as image:
            assert len(image.convert("RGB").getcolors(1 << 20)) > 50  # a rendered page, not a blank one
    assert re.search(r"Comparing \d+ Runs", compare_page)
