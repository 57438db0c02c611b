"""Bad input to the main command: one table, each case one clear line naming the problem, exit code 2,
no traceback, and nothing half written (no sweep state, no MLflow run, no registry entry).

Runs the real CLI in-process (click's runner) so the 20+ cases cost seconds; Ray is never started
because every check happens before it.
"""

from pathlib import Path

import datasets
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


def cases(tmp: Path):
    vqa = ["trial.task=vqa_rad", "trial.n_samples=4", "space={lora_rank: {choice: [4]}}"]
    tmp.mkdir(parents=True, exist_ok=True)
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("name: x\nspace: {lora_rank: [unclosed\n")
    return [
        ("malformed YAML", [str(bad_yaml)], "not valid YAML"),
        ("unknown key", [SPACE, "colour=red"], "unknown key 'colour'"),
        ("wrong type", [SPACE, "trial.epochs=two"], "epochs: expected int"),
        ("rank 0", [SPACE, "space={lora_rank: {choice: [0, 8]}}"], "lora_rank: invalid value 0"),
        ("negative lr", [SPACE, "trial.learning_rate=-0.001"], "learning_rate: invalid value -0.001"),
        ("n_samples > split", [SPACE, "space={n_samples: {choice: [100, 10000000]}}"],
         "n_samples: 10000000 is larger than the easy_vqa train split"),
        ("GPU fraction > 1", [SPACE, "resources.gpu=1.5"], "gpu: 1.5 must be 0 or a fraction"),
        ("GPU fraction < 0", [SPACE, "resources.gpu=-0.25"], "gpu: -0.25 must be 0 or a fraction"),
        ("empty space", [SPACE, "space={}"], "empty search space"),
        ("missing dataset", [SPACE, *vqa, "trial.data=/no/such/folder"], "/no/such/folder"),
        ("not a dataset", [SPACE, *vqa, f"trial.data={bad_yaml}"], str(bad_yaml)),
        ("missing columns", [SPACE, *vqa, f"trial.data={vqa_rad_folder(tmp / 'cols', columns=('image', 'question'))}"],
         "answer"),
        ("empty answers", [SPACE, *vqa, f"trial.data={vqa_rad_folder(tmp / 'empty', answers=['yes', ''] * 6)}"],
         "empty"),
        ("corrupt image", [SPACE, *vqa, f"trial.data={vqa_rad_folder(tmp / 'corrupt', image_bytes=b'not a png')}"],
         "cannot read image"),
        ("zero-byte image", [SPACE, *vqa, f"trial.data={vqa_rad_folder(tmp / 'zero', image_bytes=b'')}"],
         "img3.png"),
        ("huge image", [SPACE, *vqa, f"trial.data={vqa_rad_folder(tmp / 'huge', size=(8000, 8000))}"], "pixels"),
        ("unknown task", [SPACE, "trial.task=pathvqa"], "unknown task 'pathvqa'"),
        ("unknown model", [SPACE, "trial.model=blip3"], "trial.model: 'blip3' is neither"),
        ("missing model dir", [SPACE, f"trial.model={tmp / 'no-model'}"], "not a saved BLIP-2 directory"),
        ("unknown precision", [SPACE, "trial.precision=int9"], "'int9' is not one of"),
        ("int8 without a GPU", [SPACE, "trial.precision=int8"], "int8 needs a GPU per trial"),
        ("credentials in the tracking URI", [SPACE, "tracking_uri=http://bob:hunter2@127.0.0.1:9"],
         "tracking_uri: the URI holds credentials"),
        ("unreachable tracking URI", [SPACE, "tracking_uri=http://127.0.0.1:9"], "cannot use MLflow at http://127.0.0.1:9"),
        ("no cluster at --address", [SPACE, "--address", "127.0.0.1:1"], "no Ray cluster answers there"),
        ("invalid registered model name", [SPACE, "registered_model=a/b"], "not a valid MLflow model name"),
        ("GPU asked, none present", [SPACE, "resources.gpu=0.5", "trial.precision=fp32"], "cluster has 0 GPUs"),
    ]


def test_every_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    store = tmp_path / "mlflow.db"
    common = [f"storage_path={tmp_path / 'ray'}", f"tracking_uri=sqlite:///{store}"]
    table = cases(tmp_path / "data")
    assert len(table) >= 20
    runner = CliRunner()
    for name, args, message in table:
        space_and_overrides = [a for a in args if not a.startswith("--") and a != "127.0.0.1:1"]
        flags = [a for a in args if a not in space_and_overrides]
        overrides = common if not any(a.startswith("tracking_uri=") for a in args) else common[:1]
        result = runner.invoke(main, ["tune", *space_and_overrides, *overrides, *flags])
        assert result.exit_code == 2, (name, result.output[-1500:], result.exception)
        lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and message in lines[0], (name, result.stderr[-1500:])
        assert "Traceback" not in result.output and "hunter2" not in result.output
    ray.shutdown()  # the last case started a local cluster to count its GPUs
    assert not (tmp_path / "ray").exists() or not any((tmp_path / "ray").rglob("runner_sweep.json"))
    if store.exists():  # MLflow may have been opened (to check the URI): no run, no model in it
        client = MlflowClient(f"sqlite:///{store}")
        experiments = client.search_experiments()
        assert not client.search_runs([e.experiment_id for e in experiments])
        assert not client.search_registered_models()


def test_duplicate_rows_are_dropped_and_counted_not_fatal(tmp_path, caplog):
    from tasks import get_task

    folder = Path(vqa_rad_folder(tmp_path / "dups"))
    table = datasets.Dataset.from_parquet(str(folder / "train.parquet"))
    datasets.concatenate_datasets([table, table.select([0, 1])]).to_parquet(str(folder / "train.parquet"))
    split = get_task("vqa_rad", data=str(folder)).load_split("train")
    assert split.skipped == 2
    assert "dropped 2 exact duplicate" in caplog.text
