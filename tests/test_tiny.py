"""The tiny model's recipe still runs and still passes its own quality gate, on a shortened schedule
(the shipped artifact, runner/tiny/artifact/, is the full recipe's build: tests/test_units.py checks it)."""

import json

import pytest
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from runner.tiny import Recipe
from runner.tiny.recipe import build_with_recipe, quality_gate

pytestmark = pytest.mark.slow  # it trains (~30 s)

# One thread: the suite's other worker runs a sweep meanwhile, and the recipe's two threads then thrashed (92 s
# instead of ~22 s). The shipped build keeps its two (summation order).
SHORT = Recipe(pretrain_images=1500, stage1_steps=250, stage2_steps=150, threads=1)


def test_a_shortened_recipe_builds_a_model_that_looks_at_the_image(tmp_path):
    out = build_with_recipe(tmp_path / "tiny", SHORT, log_every=0)
    report = json.loads((out / "TINY_MODEL.json").read_text())
    assert quality_gate(report) == []  # the build itself refuses to finish otherwise; this states it
    own = report["stage2"]["held_out_caption_colour_accuracy"]
    assert own > report["stage2"]["held_out_caption_colour_accuracy_shuffled"] + 0.3
    assert set(report["files"]) >= {"model.safetensors", "tokenizer.json", "config.json"}
    model, processor = Blip2ForConditionalGeneration.from_pretrained(out), Blip2Processor.from_pretrained(out)
    assert processor.num_query_tokens == model.config.num_query_tokens


def test_the_gate_refuses_a_model_that_ignores_the_image():
    blind = {"stage2": {"held_out_caption_colour_accuracy": 0.4, "held_out_caption_colour_accuracy_shuffled": 0.35}}
    assert quality_gate(blind) and "shuffled-image control" in quality_gate(blind)[0]
