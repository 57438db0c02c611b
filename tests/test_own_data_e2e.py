"""Bring your own data, end to end: one trial on each dataset layout through the real CLI (`runner train`,
in-process, no Ray: seconds each), and one real sweep (`runner tune`: Ray Tune, a Train worker, MLflow,
promotion, the report) on a team's own CSV whose column mapping, answer-type column and filter come from the
search space."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from runner.cli import main
from tests.conftest import run_cli
from tests.test_own_data import own_csv, path_vqa_copy, slake_copy

pytestmark = pytest.mark.slow

TRIAL = ["--model", "tiny", "--precision", "fp32", "--n-samples", "8", "--batch-size", "4", "--epochs", "1",
         "--max-eval-examples", "6", "--eval-batch-size", "6"]


@pytest.mark.parametrize("task, layout", [("slake", slake_copy), ("path_vqa", path_vqa_copy)])
def test_one_trial_on_each_layout(tiny_model, tmp_path: Path, task: str, layout) -> None:
    data = layout(tmp_path / task)
    out = tmp_path / "run"
    result = CliRunner().invoke(main, ["train", "--task", task, "--data", str(data), *TRIAL, "--output", str(out)])
    assert result.exit_code == 0, (result.output[-2000:], result.exception)
    metrics = json.loads((out / "epoch-001" / "metrics.json").read_text())[-1]
    for key in ("val_closed_accuracy", "val_open_recall", "val_bleu1", "val_token_f1"):
        assert 0.0 <= metrics[key] <= 1.0, key


def test_a_sweep_on_your_own_csv_with_a_mapping(tiny_model, tmp_path: Path) -> None:
    data = own_csv(tmp_path / "ours")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    space = tmp_path / "ours.yaml"
    space.write_text(f"""name: ours
experiment: ours
registered_model: ours
trial:
  task: vqa
  data:
    path: {data}
    columns: {{image: img_path, question: q, answer: a, answer_type: kind}}
    filter: {{site: [A, B]}}
  model: tiny
  precision: fp32
  epochs: 1
  batch_size: 4
  max_eval_examples: 6
space: {{n_samples: {{choice: [8]}}}}
scheduler: {{type: none}}
storage_path: {tmp_path / 'ray'}
tracking_uri: {uri}
test_max_examples: 6
""")
    result = run_cli("tune", str(space), cwd=tmp_path, timeout=900)
    assert result.returncode == 0, (result.stdout[-3000:], result.stderr[-3000:])
    client = MlflowClient(uri)
    (trial,) = [r for r in client.search_runs([client.get_experiment_by_name("ours").experiment_id])
                if r.data.tags.get("runner.kind") == "trial"]
    assert trial.data.metrics["test_n"] == 6
    report = (tmp_path / "runs" / "reports" / "ours" / "report.md").read_text()
    assert "columns image=img_path, question=q, answer=a, answer_type=kind" in report
    assert "None shown" in report and "| Med-PaLM M 12B |" not in report
