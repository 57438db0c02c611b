"""Search-space and trial config validation: every mistake names the key and the file."""

from pathlib import Path

import pytest

from runner.config import TrialConfig, build, load_sweep
from runner.errors import UserError

GOOD = """
name: s
trial: {task: easy_vqa, model: tiny, precision: fp32, epochs: 2}
space:
  lora_rank: {choice: [4, 8]}
  learning_rate: {loguniform: [1e-4, 1e-2]}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


def test_good_space_loads_with_overrides(tmp_path):
    config = load_sweep(write(tmp_path, GOOD), ["num_samples=3", "trial.epochs=4", "resources.gpu=0.25"])
    assert config.num_samples == 3 and config.trial.epochs == 4 and config.resources.gpu == 0.25
    assert config.trial.model == "tiny" and config.scheduler.type == "asha"


def test_float_without_dot_is_a_float(tmp_path):
    # PyYAML reads 1e-4 as a string; the config must still take it as a number.
    config = load_sweep(write(tmp_path, GOOD),
                        ["trial.learning_rate=5e-4"])
    assert config.trial.learning_rate == 5e-4


@pytest.mark.parametrize("text, message", [
    ("name: [unclosed", "not valid YAML"),
    (GOOD + "colour: red\n", "colour: unknown key"),
    (GOOD.replace("epochs: 2", "epochs: two"), "trial.epochs: expected int"),
    (GOOD.replace("epochs: 2", "epochz: 2"), "trial.epochz: unknown key"),
    (GOOD.replace("precision: fp32", "precision: int9"), "'int9' is not one of"),
    (GOOD.replace("{choice: [4, 8]}", "{choice: [0, 8]}"), "space.lora_rank: 0 is below 1"),
    (GOOD.replace("[1e-4, 1e-2]", "[-1e-4, 1e-2]"), "space.learning_rate: -0.0001 must be above 0"),
    (GOOD + "  weight_decay: {loguniform: [0, 0.1]}\n", "log scale needs low > 0"),
    (GOOD.replace("[1e-4, 1e-2]", "[1e-2, 1e-4]"), "low < high"),
    (GOOD.replace("lora_rank: {choice: [4, 8]}", "lora_rnk: {choice: [4, 8]}"), "space.lora_rnk: unknown trial key"),
    (GOOD.replace("{choice: [4, 8]}", "{pick: [4, 8]}"), "expected one of"),
    (GOOD + "resources: {gpu: 1.5}\n", "gpu: 1.5 must be 0 or a fraction"),
    (GOOD + "resources: {gpu: -0.5}\n", "gpu: -0.5 must be 0 or a fraction"),
    (GOOD + "num_samples: 0\n", "num_samples: 0 is below 1"),
    ("name: s\ntrial: {}\nspace: {}\n", "space: {} is empty"),
    ("trial: {}\nspace: {lora_rank: {grid: [4]}}\n", "name: missing"),
    (GOOD + "scheduler: {type: hyperband}\n", "'hyperband' is not one of"),
    (GOOD + "search: bohb\n", "search: 'bohb' is not one of random, optuna"),
    (GOOD + "  lora_targets: {choice: ['q,v', 'q,x']}\n", "space.lora_targets: 'q,x' names 'x': not a LoRA target"),
    (GOOD.replace("epochs: 2", "lora_targets: 'q,q'"), "trial.lora_targets: 'q,q' names a layer twice"),
    (GOOD.replace("space:\n", "search: optuna\nspace:\n  lora_alpha: {grid: [8, 16]}\n"),
     "space.lora_alpha: grid is not supported by search: optuna"),
])
def test_bad_space_names_the_problem(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(UserError, match=message) as raised:
        load_sweep(path)
    assert str(path) in str(raised.value)


def test_missing_file():
    with pytest.raises(UserError, match="no such file"):
        load_sweep(Path("does/not/exist.yaml"))


def test_bad_override(tmp_path):
    with pytest.raises(UserError, match="expected key=value"):
        load_sweep(write(tmp_path, GOOD), ["num_samples"])


def test_trial_config_checks_types_and_ranges():
    assert build(TrialConfig, {"learning_rate": "1e-3"}, "cli").learning_rate == 1e-3
    with pytest.raises(UserError, match="cli: batch_size: expected int, got True"):
        build(TrialConfig, {"batch_size": True}, "cli")
    with pytest.raises(UserError, match="learning_rate: -0.1 must be above 0"):
        build(TrialConfig, {"learning_rate": -0.1}, "cli")


def test_every_problem_of_a_file_is_reported_at_once(tmp_path):
    text = GOOD.replace("epochs: 2", "epochs: 0, lora_rank: 0").replace("{choice: [4, 8]}", "{choice: [4, -8]}")
    with pytest.raises(UserError) as raised:
        load_sweep(write(tmp_path, text + "num_samples: 0\nresources: {gpu: 2}\n"))
    message = str(raised.value)
    for part in ("trial.epochs: 0 is below 1", "trial.lora_rank: 0 is below 1", "space.lora_rank: -8 is below 1",
                 "num_samples: 0 is below 1", "resources.gpu: 2.0 must be 0 or a fraction in (0, 1]"):
        assert part in message, (part, message)
    assert "\n" not in message  # one line


def test_sweep_config_round_trips_through_its_logged_copy(tmp_path):
    from runner.config import sweep_from_dict

    config = load_sweep(write(tmp_path, GOOD), ["num_samples=3"])
    assert sweep_from_dict(config.to_dict(), "copy") == config
    assert config.to_dict()["space"] == {"lora_rank": {"choice": [4, 8]}, "learning_rate": {"loguniform": [1e-4, 1e-2]}}
    assert config.space["lora_rank"].largest == 8 and config.space["learning_rate"].largest == 1e-2
