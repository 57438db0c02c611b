"""The search part of the tuner (runner/sweep/tuner.py) with Ray's real searchers, no Ray cluster: what each
searcher draws from a space file, the concurrency limit, derived keys, and the searcher state a resumed sweep
continues from (Tune saves it with the experiment through `save_to_dir` and restores it the same way)."""

import math
from pathlib import Path

import pytest
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.variant_generator import generate_variants

from runner.config import load_sweep
from runner.sweep.tuner import MetricResultsOptuna, param_space, search_algorithm

SPACE = """
name: s
trial: {task: easy_vqa, model: tiny, precision: fp32, seed: 3}
search: SEARCH
space:
  lora_rank: {choice: [4, 8, 16]}
  lora_alpha: {times: [2, lora_rank]}
  learning_rate: {loguniform: [1.0e-4, 1.0e-2]}
  lora_dropout: {uniform: [0.0, 0.2]}
  warmup_ratio: {uniform: [0.0, 0.3]}
  weight_decay: {choice: [0.0, 0.01, 0.1]}
  lora_targets: {choice: ["q,v", "q,k,v,o", "q,k,v,o,wi,wo", "q,v,query,value"]}
  n_samples: {randint: [100, 200]}
"""


def sweep(tmp_path: Path, search: str, text: str = SPACE, overrides=()):
    path = tmp_path / "space.yaml"
    path.write_text(text.replace("SEARCH", search))
    return load_sweep(path, list(overrides))


def score(config: dict) -> float:
    """A made-up validation score with a best learning rate of 1e-3 (what TPE should find)."""
    return -abs(math.log10(config["learning_rate"]) + 3)


def run_trials(searcher, first: int, count: int) -> list[dict]:
    drawn = []
    for number in range(first, first + count):
        config = searcher.suggest(f"t{number}")
        searcher.on_trial_result(f"t{number}", {"val_exact_match": score(config), "training_iteration": 1})
        searcher.on_trial_complete(f"t{number}", {"val_exact_match": score(config)})
        drawn.append(config)
    return drawn


def test_optuna_draws_every_knob_within_its_domain_and_derives_alpha(tmp_path):
    config = sweep(tmp_path, "optuna")
    assert param_space(config) == {}  # Optuna brings its own space: a Tuner with both would refuse
    searcher = search_algorithm(config, max_concurrent=2)
    assert isinstance(searcher, ConcurrencyLimiter) and searcher.max_concurrent == 2
    assert isinstance(searcher.searcher, MetricResultsOptuna)
    drawn = run_trials(searcher, 0, 12)
    for trial in drawn:
        assert trial["lora_rank"] in (4, 8, 16) and trial["lora_alpha"] == 2 * trial["lora_rank"]
        assert 1e-4 <= trial["learning_rate"] <= 1e-2 and 0 <= trial["lora_dropout"] <= 0.2
        assert 0 <= trial["warmup_ratio"] <= 0.3 and trial["weight_decay"] in (0.0, 0.01, 0.1)
        assert 100 <= trial["n_samples"] < 200  # randint's upper end is exclusive, as in Tune
        assert isinstance(trial["lora_targets"], str)
    assert len({trial["lora_targets"] for trial in drawn}) > 1


def test_optuna_keeps_the_concurrency_limit_and_ignores_a_failing_trials_reason(tmp_path):
    searcher = search_algorithm(sweep(tmp_path, "optuna"), max_concurrent=2)
    assert searcher.suggest("a") and searcher.suggest("b")
    assert searcher.suggest("c") is None  # two running: no third
    searcher.on_trial_result("a", {"fatal_error": "TrialDiverged: loss became nan"})  # no metric: no KeyError
    searcher.on_trial_complete("a", {"fatal_error": "TrialDiverged: loss became nan"}, error=True)
    assert searcher.suggest("c")


def test_a_resumed_optuna_search_proposes_what_the_uninterrupted_one_would(tmp_path):
    """14 trials: past TPE's 10 random start-up trials, so the model's proposals are compared too."""
    config = sweep(tmp_path, "optuna")
    uninterrupted = run_trials(search_algorithm(config, 1), 0, 14)
    first = search_algorithm(config, 1)
    before = run_trials(first, 0, 11)
    first.save_to_dir(str(tmp_path), session_str="sweep")  # what Tune does at each experiment checkpoint
    resumed = search_algorithm(config, 1)
    resumed.restore_from_dir(str(tmp_path))
    assert before + run_trials(resumed, 11, 3) == uninterrupted
    fresh = run_trials(search_algorithm(config, 1), 11, 3)  # without the state: a restart of the sequence
    assert fresh != uninterrupted[11:]


def test_optuna_and_random_are_seeded_by_the_trial_seed(tmp_path):
    one, again = (run_trials(search_algorithm(sweep(tmp_path, "optuna"), 1), 0, 3) for _ in range(2))
    other = run_trials(search_algorithm(sweep(tmp_path, "optuna", overrides=["trial.seed=4"]), 1), 0, 3)
    assert one == again != other
    random = search_algorithm(sweep(tmp_path, "random"), max_concurrent=2)
    assert isinstance(random, BasicVariantGenerator) and random.max_concurrent == 2


GRID = """
name: g
trial: {task: easy_vqa, model: tiny, precision: fp32}
search: SEARCH
num_samples: 2
space:
  lora_rank: {grid: [4, 8, 16]}
  lora_alpha: {times: [2, lora_rank]}
  learning_rate: {loguniform: [1.0e-4, 1.0e-2]}
"""


def test_random_walks_a_grid_times_a_log_uniform_rate_with_alpha_twice_the_rank(tmp_path):
    config = sweep(tmp_path, "random", GRID)
    drawn = [resolved for _ in range(config.num_samples) for _, resolved in generate_variants(param_space(config))]
    assert sorted(trial["lora_rank"] for trial in drawn) == [4, 4, 8, 8, 16, 16]
    assert all(trial["lora_alpha"] == 2 * trial["lora_rank"] for trial in drawn)
    assert len({trial["learning_rate"] for trial in drawn}) == 6 and all(
        1e-4 <= trial["learning_rate"] <= 1e-2 for trial in drawn)


def test_alpha_follows_a_fixed_rank_too(tmp_path):
    config = sweep(tmp_path, "random", GRID.replace("lora_rank: {grid: [4, 8, 16]}", "lora_dropout: {grid: [0.0]}"))
    assert all(trial["lora_alpha"] == 16 for _, trial in generate_variants(param_space(config)))  # 2 x rank 8
    searcher = search_algorithm(sweep(tmp_path, "optuna", GRID.replace("{grid: [4, 8, 16]}", "{choice: [4]}")), 1)
    assert searcher.suggest("a")["lora_alpha"] == 8


@pytest.mark.parametrize("change, message", [
    (("{grid: [4, 8, 16]}", "{grid: [4, 8, 16]}"), "space.lora_rank: grid is not supported by search: optuna"),
    (("[2, lora_rank]", "[2, lora_rnk]"), "space.lora_alpha.times: 'lora_rnk' is not another trial key"),
    (("[2, lora_rank]", "[lora_rank, 2]"), "space.lora_alpha.times: expected [factor, trial key]"),
    (("[2, lora_rank]", "[-2, lora_rank]"), "space.lora_alpha: -8.0 must be above 0"),
    (("[2, lora_rank]", "[2, task]"), "space.lora_alpha.times: task is not a number"),
    (("lora_rank: {grid: [4, 8, 16]}", "lora_rank: {times: [1, lora_alpha]}"), "lora_rank is itself computed"),
])
def test_a_bad_domain_is_named(tmp_path, change, message):
    from runner.errors import UserError

    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(")):
        sweep(tmp_path, "optuna", GRID.replace(*change))


# --- end to end: a killed Optuna sweep resumes its searcher ----------------------------------------------

@pytest.mark.slow
def test_an_interrupted_optuna_sweep_resumes_proposing_what_it_would_have(store):
    """The store's weak sweep (tests/conftest.py): an Optuna search whose driver was interrupted (SIGINT) in its first
    trial and resumed; the second trial was proposed after the resume."""
    from tests.conftest import SPACE, WEAK

    client = store["client"]
    experiment = client.get_experiment_by_name("quickstart")
    sweep = client.search_runs([experiment.experiment_id], "tags.`runner.sweep` = 'weak'")[0]
    runs = sorted(client.search_runs([experiment.experiment_id], "tags.`runner.kind` = 'trial' and "
                                     f"tags.`runner.sweep_run_id` = '{sweep.info.run_id}'"),
                  key=lambda run: run.info.start_time)
    assert len(runs) == 2 and all(run.info.status == "FINISHED" for run in runs)
    # The same space, searched uninterrupted in-process and told the same results, proposes the same trials.
    searcher = search_algorithm(load_sweep(Path(SPACE), WEAK), max_concurrent=1)
    for number, run in enumerate(runs):
        expected = searcher.suggest(str(number))
        assert {key: run.data.params[key] for key in expected} == {k: str(v) for k, v in expected.items()}
        searcher.on_trial_complete(str(number), {"val_exact_match": run.data.metrics["val_exact_match"]})
    assert runs[0].data.params != runs[1].data.params
