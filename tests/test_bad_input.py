"""Bad input to the main command: one table, each case one clear line naming the problem, exit code 2,
no traceback, and nothing half written (no sweep state, no MLflow run, no registry entry).

Runs the real CLI in-process (click's runner) so the cases cost seconds; one test per case, so one
failure hides none of the others. Ray is started only by the case that counts the cluster's GPUs.
"""

from pathlib import Path

import datasets
import pytest
import ray
from click.testing import CliRunner
from mlflow import MlflowClient
from PIL import Image

from runner.cli import main
from tests.conftest import SPACE


def vqa_rad_folder(root: Path, *, columns=("image", "question", "answer"), answers=None,
                   image_bytes: bytes | None = None, size=(32, 32)) -> str:
    """A local dataset in the hub dataset's schema (parquet with a datasets Image column)."""
    root.mkdir(parents=True)
    images = []
    for i in range(12):
        path = root / f"img{i}.png"
        Image.new("RGB", size if i == 0 else (32, 32), (20 * i, 0, 0)).save(path)
        if image_bytes is not None and i == 3:
            path.write_bytes(image_bytes)
        images.append(str(path))
    data = {"image": images, "question": [f"is it {i}?" for i in range(12)],
            "answer": answers or ["yes", "no"] * 6}
    for split in ("train", "test"):
        table = datasets.Dataset.from_dict({k: v for k, v in data.items() if k in columns})
        if "image" in columns:
            table = table.cast_column("image", datasets.Image())
        table.to_parquet(str(root / f"{split}.parquet"))
    return str(root)


VQA = ["trial.task=vqa_rad", "trial.n_samples=4", "space={lora_rank: {choice: [4]}}"]
# (case, arguments after SPACE or the file, the message its one line must hold). `{tmp}`: the case's folder;
# `{data:...}`: a VQA-RAD-schema folder written for the case (see `data_folder`).
CASES = [
    ("malformed YAML", ["{bad_yaml}"], "not valid YAML"),
    ("unknown key", [SPACE, "colour=red"], "colour: unknown key"),
    ("wrong type", [SPACE, "trial.epochs=two"], "trial.epochs: expected int"),
    ("rank 0", [SPACE, "space={lora_rank: {choice: [0, 8]}}"], "space.lora_rank: 0 is below 1"),
    ("negative lr", [SPACE, "trial.learning_rate=-0.001"], "trial.learning_rate: -0.001 must be above 0"),
    ("n_samples > split", [SPACE, "space={n_samples: {choice: [100, 10000000]}}"],
     "n_samples: 10000000 is larger than the easy_vqa train split"),
    ("GPU fraction > 1", [SPACE, "resources.gpu=1.5"], "resources.gpu: 1.5 must be 0 or a fraction"),
    ("GPU fraction < 0", [SPACE, "resources.gpu=-0.25"], "resources.gpu: -0.25 must be 0 or a fraction"),
    ("empty space", [SPACE, "space={}"], "space: {} is empty"),
    ("missing dataset", [SPACE, *VQA, "trial.data=/no/such/folder"], "/no/such/folder"),
    ("not a dataset", [SPACE, *VQA, "trial.data={bad_yaml}"], "bad.yaml"),
    ("missing columns", [SPACE, *VQA, "trial.data={data:no_answer}"], "answer"),
    ("empty answers", [SPACE, *VQA, "trial.data={data:empty_answers}"], "empty"),
    ("corrupt image", [SPACE, *VQA, "trial.data={data:corrupt}"], "cannot read image"),
    ("zero-byte image", [SPACE, *VQA, "trial.data={data:zero_bytes}"], "img3.png"),
    ("huge image", [SPACE, *VQA, "trial.data={data:huge}"], "pixels"),
    ("unknown task", [SPACE, "trial.task=pathvqa"], "unknown task 'pathvqa'"),
    ("unknown model", [SPACE, "trial.model=blip3"], "trial.model: 'blip3' is neither"),
    ("missing model dir", [SPACE, "trial.model={tmp}/no-model"], "not a saved BLIP-2 directory"),
    ("unknown precision", [SPACE, "trial.precision=int9"], "'int9' is not one of"),
    ("int8 without a GPU", [SPACE, "trial.precision=int8"], "int8 needs a GPU per trial"),
    ("credentials in the tracking URI", [SPACE, "tracking_uri=http://bob:hunter2@127.0.0.1:9"],
     "tracking_uri: the URI holds credentials"),
    ("unreachable tracking URI", [SPACE, "tracking_uri=http://127.0.0.1:9"], "cannot use MLflow at http://127.0.0.1:9"),
    ("no cluster at --address", [SPACE, "--address", "127.0.0.1:1"], "no Ray cluster answers there"),
    ("invalid registered model name", [SPACE, "registered_model=a/b"], "not a valid MLflow model name"),
    ("GPU asked, none present", [SPACE, "resources.gpu=0.5", "trial.precision=fp32"], "cluster has 0 GPUs"),
    ("three mistakes at once", [SPACE, "trial.epochs=0", "num_samples=0", "space={lora_rank: {choice: [0]}}"],
     "trial.epochs: 0 is below 1; space.lora_rank: 0 is below 1; num_samples: 0 is below 1"),
]
DATA = {"no_answer": dict(columns=("image", "question")), "empty_answers": dict(answers=["yes", ""] * 6),
        "corrupt": dict(image_bytes=b"not a png"), "zero_bytes": dict(image_bytes=b""), "huge": dict(size=(8000, 8000))}


def resolve(arg: str, tmp: Path) -> str:
    if "{bad_yaml}" in arg:
        bad_yaml = tmp / "bad.yaml"
        bad_yaml.write_text("name: x\nspace: {lora_rank: [unclosed\n")
        return arg.replace("{bad_yaml}", str(bad_yaml))
    if "{data:" in arg:
        name = arg[arg.index("{data:") + 6 : arg.index("}")]
        return arg.replace(f"{{data:{name}}}", vqa_rad_folder(tmp / name, **DATA[name]))
    return arg.replace("{tmp}", str(tmp))


@pytest.mark.parametrize("case, args, message", [c if hasattr(c, "marks") else pytest.param(*c, id=c[0])
                                                 for c in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "mlflow.db"
    args = [resolve(arg, tmp_path) for arg in args]
    flags = args[args.index("--address"):] if "--address" in args else []
    overrides = [f"storage_path={tmp_path / 'ray'}"]
    if not any(arg.startswith("tracking_uri=") for arg in args):
        overrides.append(f"tracking_uri=sqlite:///{store}")
    result = CliRunner().invoke(main, ["tune", *args[: len(args) - len(flags)], *overrides, *flags])
    ray.shutdown()  # a case that got as far as counting the cluster's GPUs started a local one
    assert result.exit_code == 2, (result.output[-1500:], result.exception)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], result.stderr[-1500:]
    assert "Traceback" not in result.output and "hunter2" not in result.output
    assert not any((tmp_path / "ray").rglob("runner_sweep.json"))  # no sweep state
    if store.exists():  # MLflow may have been opened (to check the URI): no run, no model in it
        client = MlflowClient(f"sqlite:///{store}")
        assert not client.search_runs([e.experiment_id for e in client.search_experiments()])
        assert not client.search_registered_models()


def test_duplicate_rows_are_dropped_and_counted_not_fatal(tmp_path, caplog):
    from tasks import get_task

    folder = Path(vqa_rad_folder(tmp_path / "dups"))
    table = datasets.Dataset.from_parquet(str(folder / "train.parquet"))
    datasets.concatenate_datasets([table, table.select([0, 1])]).to_parquet(str(folder / "train.parquet"))
    split = get_task("vqa_rad", data=str(folder)).load_split("train")
    assert split.skipped == 2
    assert "dropped 2 exact duplicate" in caplog.text
