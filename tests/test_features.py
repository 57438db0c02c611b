"""The image-feature cache (runner/model/features.py) on the tiny model and real easy-VQA images: the cached path
gives the model's own logits, a second run computes nothing, and another model or precision misses."""

import shutil
import threading

import pytest
import torch

from runner.model.blip2 import (
    encode_answers,
    encode_prompts,
    image_token_id,
    load_blip2,
    text_embeddings,
)
from runner.model.features import compute_image_features, feature_cache
from tasks import get_task

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pictures() -> dict:
    split = get_task("easy_vqa").load_split("train")
    keys = sorted(split.images)[:6]
    questions = [next(ex for ex in split.examples if ex.image_key == key) for key in keys]
    return {"images": {key: split.images[key] for key in keys}, "questions": questions}


def vision_calls(model) -> list:
    calls = []
    model.vision_model.register_forward_hook(lambda *args: calls.append(1))
    return calls


def features_with_cache(model_dir, precision, dtype, root, images):
    model, processor = load_blip2(str(model_dir), precision, CPU)
    cache = feature_cache(root, str(model_dir), None, precision, dtype, model, processor)
    calls = vision_calls(model)
    return compute_image_features(model, processor, images, CPU, dtype, batch_size=4, cache=cache), cache, calls


def test_cached_features_reproduce_the_models_own_logits(tiny_model, pictures, tmp_path):
    model, processor = load_blip2(str(tiny_model), "fp32", CPU)
    cache = feature_cache(tmp_path, str(tiny_model), None, "fp32", torch.float32, model, processor)
    first = compute_image_features(model, processor, pictures["images"], CPU, torch.float32, 4, cache)
    assert len(list(cache.directory.rglob("*.safetensors"))) == len(pictures["images"])
    calls = vision_calls(model)
    second = compute_image_features(model, processor, pictures["images"], CPU, torch.float32, 4, cache)
    assert calls == []  # every image came from disk
    assert torch.equal(first.values, second.values)

    # A damaged entry is computed again (and rewritten), not trusted and not fatal.
    damaged = cache.path(sorted(pictures["images"])[0])
    damaged.write_bytes(b"not a safetensors file")
    third = compute_image_features(model, processor, pictures["images"], CPU, torch.float32, 4, cache)
    assert len(calls) == 1 and torch.equal(third.values, first.values)
    assert cache.load(sorted(pictures["images"])[0]) is not None

    # Our path (cached features scattered into the prompt) vs transformers' full forward from pixels.
    questions = pictures["questions"]
    prompts = [get_task("easy_vqa").prompt(ex.question) for ex in questions]
    encoded = encode_prompts(processor, prompts, CPU)
    labels = encode_answers(processor, [ex.answer for ex in questions], CPU)
    pixels = processor.image_processor([pictures["images"][ex.image_key] for ex in questions],
                                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = model(pixel_values=pixels, input_ids=encoded["input_ids"],
                          attention_mask=encoded["attention_mask"], labels=labels).logits
        embeds = text_embeddings(model, encoded["input_ids"], second.lookup([ex.image_key for ex in questions]),
                                 image_token_id(processor))
        ours = model.language_model(inputs_embeds=embeds, attention_mask=encoded["attention_mask"],
                                    labels=labels).logits
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)


def test_another_precision_or_rewritten_weights_miss_the_cache(tiny_model, pictures, tmp_path):
    root, images = tmp_path / "cache", pictures["images"]
    fp32, fp32_cache, _ = features_with_cache(tiny_model, "fp32", torch.float32, root, images)

    bf16, bf16_cache, calls = features_with_cache(tiny_model, "bf16", torch.bfloat16, root, images)
    assert bf16_cache.directory != fp32_cache.directory and calls  # computed, not loaded
    assert bf16.values.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.values.float(), fp32.values, rtol=0.05, atol=0.05)

    # A model directory whose weights are rewritten in place (another image path) is another model.
    changed = tmp_path / "changed"
    shutil.copytree(tiny_model, changed)
    before, before_cache, _ = features_with_cache(changed, "fp32", torch.float32, root, images)
    model, _ = load_blip2(str(changed), "fp32", CPU)
    with torch.no_grad():
        model.language_projection.weight.mul_(2.0)
    model.save_pretrained(changed)
    second, second_cache, calls = features_with_cache(changed, "fp32", torch.float32, root, images)
    assert second_cache.directory != before_cache.directory and calls
    assert not torch.allclose(second.values, before.values)
    again, _, calls = features_with_cache(changed, "fp32", torch.float32, root, images)
    assert calls == [] and torch.equal(again.values, second.values)


def images_computed(model) -> list[int]:
    """The batch size of every pass through the frozen vision tower of `model`."""
    sizes: list[int] = []
    model.vision_model.register_forward_hook(lambda module, args, output: sizes.append(len(output[0])))
    return sizes


def test_trials_starting_together_compute_each_image_once(tiny_model, tmp_path):
    """Two trials (each its own model, as two processes would have) start at once on one node's cache with
    overlapping images: the cache's lock makes one compute, the other wait and compute only the rest."""
    split = get_task("easy_vqa").load_split("train")
    keys = sorted(split.images)[:24]
    wanted = [{key: split.images[key] for key in keys[:16]}, {key: split.images[key] for key in keys[8:]}]
    start, results = threading.Barrier(2), [None, None]
    # Loaded one after the other: transformers' from_pretrained is not thread-safe (its meta-device context).
    loaded = [load_blip2(str(tiny_model), "fp32", CPU) for _ in range(2)]

    def trial(index: int) -> None:
        model, processor = loaded[index]
        cache = feature_cache(tmp_path, str(tiny_model), None, "fp32", torch.float32, model, processor)
        sizes = images_computed(model)
        start.wait()
        results[index] = (compute_image_features(model, processor, wanted[index], CPU, torch.float32, 4, cache),
                          sizes)

    threads = [threading.Thread(target=trial, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sum(sum(sizes) for _, sizes in results) == len(keys)  # 24 images, not 16 + 16
    shared = keys[8:16]
    torch.testing.assert_close(results[0][0].lookup(shared), results[1][0].lookup(shared))


def test_one_scorer_loads_the_model_once_and_scores_the_bare_model_exactly(tiny_model, tmp_path, monkeypatch):
    """Promotion (adapter) and the zero/one-shot stages (bare model) share one loaded base model: the bare
    scores through PEFT's `disable_adapter` equal a freshly loaded bare model's."""
    import runner.eval.evaluate as evaluate
    from runner.config import TrialConfig
    from runner.model.blip2 import add_lora

    model, _ = load_blip2(str(tiny_model), "fp32", CPU)
    lora = add_lora(model, rank=4, alpha=8.0, dropout=0.0, gradient_checkpointing=False, targets=("q", "v"))
    torch.manual_seed(0)
    for name, weight in lora.named_parameters():
        if "lora_B" in name:  # LoRA starts as the identity (B = 0): a random B makes the adapter a real change
            torch.nn.init.normal_(weight, std=0.5)
    lora.save_pretrained(tmp_path / "adapter")
    config = TrialConfig(task="easy_vqa", model=str(tiny_model), precision="fp32", device="cpu",
                         max_eval_examples=16, eval_batch_size=16, max_new_tokens=4)
    loads = []
    real_load = evaluate.load_blip2
    monkeypatch.setattr(evaluate, "load_blip2", lambda *args: loads.append(args) or real_load(*args))

    scorer = evaluate.SplitScorer(config, "test", adapter=tmp_path / "adapter")
    tuned = scorer.score(with_adapter=True)
    zero_shot, one_shot = scorer.score(with_adapter=False), scorer.score(with_adapter=False, one_shot=True)
    assert len(loads) == 1
    fresh = evaluate.SplitScorer(config, "test")  # no adapter ever injected
    assert zero_shot.rows == fresh.score(with_adapter=False).rows
    assert one_shot.rows == fresh.score(with_adapter=False, one_shot=True).rows
    assert [row["prediction"] for row in tuned.rows] != [row["prediction"] for row in zero_shot.rows]
    assert tuned.fingerprint == zero_shot.fingerprint  # the same test questions
    # The sweep's tail loads the scorer before the champion is known; its adapter comes after the bare scores.
    fresh.add_adapter(tmp_path / "adapter")
    assert fresh.score(with_adapter=True).rows == tuned.rows
    assert fresh.score(with_adapter=False).rows == zero_shot.rows


@pytest.fixture(scope="module")
def tiny_fp32(tiny_model):
    return load_blip2(str(tiny_model), "fp32", CPU)


ATTENTION, ALL_T5 = {"q", "k", "v", "o"}, {"q", "k", "v", "o", "wi_0", "wi_1", "wo"}  # gated Flan-T5: wi_0, wi_1


@pytest.mark.parametrize("targets, t5_layers", [("q,v", {"q", "v"}), ("q,k,v,o", ATTENTION),
                                                ("q,k,v,o,wi,wo", ALL_T5), ("q,v,query,value", {"q", "v"})])
def test_cached_features_give_the_full_forwards_logits_for_each_lora_target_choice(tiny_model, tiny_fp32, pictures,
                                                                                  tmp_path, targets, t5_layers):
    """As a trial does it: features (cached) before LoRA is added, then the adapted model. With the Q-Former
    adapted, only the vision tower's output may come from the cache; its LoRA must act at every step."""
    import copy

    from runner.config import TrialConfig
    from runner.model.blip2 import add_lora

    config = TrialConfig(model=str(tiny_model), precision="fp32", lora_targets=targets)
    loaded, processor = tiny_fp32
    base, frozen = copy.deepcopy(loaded), loaded  # frozen: the model before LoRA, what a stale cache reflects  # the image path as it was before LoRA: what a stale cache would hold
    cache = feature_cache(tmp_path, str(tiny_model), None, "fp32", torch.float32, base, processor,
                          vision_only=config.trains_qformer)
    compute_image_features(base, processor, pictures["images"], CPU, torch.float32, 4, cache, config.trains_qformer)
    calls = vision_calls(base)
    features = compute_image_features(base, processor, pictures["images"], CPU, torch.float32, 4, cache,
                                      config.trains_qformer)
    assert calls == [] and features.vision_only == config.trains_qformer  # all from the cache
    model = add_lora(base, rank=4, alpha=8, dropout=0.0, gradient_checkpointing=False,
                     targets=config.target_modules)
    adapted = {name.split(".base_model.model.")[-1].split(".lora_")[0] for name, _ in model.named_parameters()
               if "lora_B" in name}
    assert any(".qformer." in f".{name}" for name in adapted) == config.trains_qformer
    assert {name.rsplit(".", 1)[-1] for name in adapted if "language_model" in name} == t5_layers
    assert {name.rsplit(".", 1)[-1] for name in adapted if "qformer" in name} <= {"query", "value"}
    with torch.no_grad():  # LoRA's B starts at zero (a no-op): give every adapter an effect to get wrong
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.5, generator=torch.Generator().manual_seed(len(name)))
    model.eval()

    questions = pictures["questions"]
    encoded = encode_prompts(processor, [get_task("easy_vqa").prompt(ex.question) for ex in questions], CPU)
    labels = encode_answers(processor, [ex.answer for ex in questions], CPU)
    pixels = processor.image_processor([pictures["images"][ex.image_key] for ex in questions],
                                       return_tensors="pt")["pixel_values"]
    keys = [ex.image_key for ex in questions]

    def logits(image_rows):
        embeds = text_embeddings(base, encoded["input_ids"], image_rows, image_token_id(processor))
        return base.language_model(inputs_embeds=embeds, attention_mask=encoded["attention_mask"],
                                   labels=labels).logits

    with torch.no_grad():
        reference = model(pixel_values=pixels, input_ids=encoded["input_ids"],
                          attention_mask=encoded["attention_mask"], labels=labels).logits
        ours = logits(features.language_inputs(base, keys))
        stale = logits(compute_image_features(frozen, processor, pictures["images"], CPU, torch.float32).lookup(keys))
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-4)
    # Only an adapted Q-Former makes the frozen path's projected features wrong: the test can tell.
    assert torch.allclose(stale, reference, rtol=1e-4, atol=1e-4) != config.trains_qformer
