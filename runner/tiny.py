"""The offline tiny BLIP-2 (Flan-T5 style): built from a config, pre-trained for ~1-2 CPU minutes.

Why this exists
---------------
Tests and the quick-start need a BLIP-2 that loads through exactly the code path of
`Salesforce/blip2-flan-t5-xl` (`Blip2ForConditionalGeneration.from_pretrained` +
`Blip2Processor.from_pretrained`) without a download, and that actually *looks at the image*:
a LoRA fine-tune of its language model on easy-VQA must do clearly better with each question's own
image than with a shuffled one. A randomly initialised tiny BLIP-2 does not: LoRA learns the
question prior only (FACTS.md). So `build_tiny_blip2` pre-trains the model, as BLIP-2 itself was
pre-trained before anyone fine-tuned it, on easy-VQA *train* images only, never on questions:

Stage 1 - vision-language representation (vision encoder, Q-Former, query tokens, projection).
    Auxiliary heads read the mean of the projected query outputs (the vectors T5 will see) and
    classify the image's colour (8) and shape (3). Per-image labels come from the package's own
    train questions/answers ("what color is the shape?" -> blue; "is there not a circle?" -> no ...).
    Colour is learnt in ~100 steps; shape is hard for a ViT trained from scratch (it plateaued at
    chance in earlier attempts), so two dense auxiliary losses on the vision tokens speed it up:
    every patch that touches the shape predicts (a) the image's shape label and (b) its own 4x4
    foreground mask (foreground = pixels that differ from the background colour, computed from the
    pixels). Both heads are discarded afterwards; only the BLIP-2 weights are kept.

Stage 2 - image-grounded caption generation (BLIP-2's generative pre-training), T5 + projection.
    The image path is frozen and its Q-Former output cached; T5 (all weights) and the language
    projection learn to generate a caption such as "blue circle" from the image tokens and a
    neutral prompt ("a picture of"). The two words come in random order, so the first generated
    token must depend on both attributes. T5 never sees a question or the words "yes"/"no" as a
    target: zero-shot VQA is poor and the LoRA fine-tune has to teach question answering, which is
    the comparison the product reports. Training the projection jointly keeps the image tokens at
    the scale of T5's word embeddings (a random model feeds T5 image tokens ~1e-3 of that scale).

Images 0..2999 of the package's train split are used for pre-training; 3000..3999 are held out and
used only to report held-out accuracies in TINY_MODEL.json. The test split is never read.

Traps handled (FACTS.md): `Blip2VisionConfig.initializer_range` defaults to 1e-10 (a blind model),
so it is set to 0.02; `_init_weights` zeroes `query_tokens`, so they are re-drawn (std 0.02); the
processor adds the `<image>` token itself and `image_token_index` is set to its id; T5Config in
transformers 5.24 ties the input and output embeddings.
"""

from __future__ import annotations

import json
import logging
import math
import random
import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

TINY_VERSION = "1"

COLORS = ("red", "green", "blue", "black", "gray", "teal", "yellow", "brown")
SHAPES = ("circle", "rectangle", "triangle")
CAPTION_PROMPT = "a picture of"
# Words the tokenizer knows besides the easy-VQA questions/answers: the QA prompt and the caption prompt.
EXTRA_WORDS = ("question", "answer", ":", ".", ",", "picture", "true", "false")
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 as in T5


@dataclass(frozen=True)
class Recipe:
    """Every number of the build; written to TINY_MODEL.json."""

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 64
    vision_layers: int = 2
    qformer_layers: int = 2
    heads: int = 4
    num_query_tokens: int = 8
    text_d_model: int = 64
    text_layers: int = 2
    text_ff: int = 128
    pretrain_images: int = 3000  # train images 0..N-1; the rest of train is held out
    stage1_steps: int = 800
    stage1_batch: int = 32
    stage1_lr: float = 3e-3
    dense_weight: float = 1.0
    mask_weight: float = 1.0
    mask_grid: int = 4  # each patch predicts its foreground on a grid x grid raster
    boundary_only: bool = True  # dense shape labels only on patches the shape's outline crosses
    stage2_steps: int = 600
    stage2_batch: int = 64
    stage2_lr: float = 2e-3
    random_order: bool = True
    itm: str = "none"  # "none" | "yes_no" | "true_false": answer words of the matching task
    itm_fraction: float = 0.5
    threads: int = 2


def build_tiny_blip2(output_dir: Path, *, seed: int = 0, log_every: int = 100) -> Path:
    """Build, pre-train and save the tiny BLIP-2 + processor into `output_dir`; return it.

    Deterministic for a seed (on a given machine and thread count). Takes ~1-2 minutes on 2 CPU
    cores. `Blip2ForConditionalGeneration.from_pretrained(output_dir)` and
    `Blip2Processor.from_pretrained(output_dir)` load the result; `TINY_MODEL.json` records the
    recipe, the pre-training losses/accuracies and the time taken.
    """
    return build_with_recipe(Path(output_dir), Recipe(), seed=seed, log_every=log_every)


def build_with_recipe(output_dir: Path, recipe: Recipe, *, seed: int = 0, log_every: int = 100) -> Path:
    """`build_tiny_blip2` with an explicit recipe (for experiments; the default is `Recipe()`)."""
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.threads)
    try:
        _seed_everything(seed)
        data = _load_pretraining_data(recipe)
        processor = _build_processor(recipe)
        model = _build_model(recipe, processor)
        report: dict[str, object] = {"recipe": asdict(recipe), "seed": seed, "tiny_version": TINY_VERSION}
        t0 = time.perf_counter()
        report["stage1"] = _stage1(model, data, recipe, log_every)
        report["stage1"]["seconds"] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        report["stage2"] = _stage2(model, processor, data, recipe, log_every)
        report["stage2"]["seconds"] = round(time.perf_counter() - t0, 1)
        model.eval()
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output_dir)
        processor.save_pretrained(output_dir)
        _check_round_trip(model, output_dir, data)
        report["parameters"] = sum(p.numel() for p in model.parameters())
        report["seconds"] = round(time.perf_counter() - started, 1)
        (output_dir / "TINY_MODEL.json").write_text(json.dumps(report, indent=2) + "\n")
        log.info("tiny BLIP-2 built in %.1f s into %s", report["seconds"], output_dir)
    finally:
        torch.set_num_threads(previous_threads)
    return output_dir


# --------------------------------------------------------------------------------------------- data


@dataclass
class _Data:
    pixels: torch.Tensor  # [N, 3, S, S] normalised as the image processor does
    colour: torch.Tensor  # [N] index into COLORS, -100 unknown
    shape: torch.Tensor  # [N] index into SHAPES, -100 unknown
    patch_shape: torch.Tensor  # [N, P] shape label of patches that touch the shape, else -100
    patch_mask: torch.Tensor  # [N, P, g*g] foreground fraction on a g x g raster inside each patch
    train: torch.Tensor  # image indices used for pre-training
    held_out: torch.Tensor  # image indices held out


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def image_labels(questions: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]) -> dict[int, tuple[int, int]]:
    """Per-image (colour, shape) indices derived from easy-VQA questions/answers (-100: unknown).

    Open questions give the attribute directly; yes/no questions give it when the answer says the
    named colour/shape is present, and by elimination when all others are said to be absent.
    """
    known: dict[int, dict[str, str]] = {}
    absent: dict[int, set[str]] = {}
    for question, answer, image_id in zip(questions, answers, image_ids):
        facts = known.setdefault(image_id, {})
        if answer in COLORS:
            facts["colour"] = answer
            continue
        if answer in SHAPES:
            facts["shape"] = answer
            continue
        words = question.rstrip("?").split()
        negated = "not" in words or words[:2] == ["is", "no"]
        present = (answer == "yes") != negated
        for word in words:
            if word in COLORS or word in SHAPES:
                kind = "colour" if word in COLORS else "shape"
                if present:
                    facts[kind] = word
                else:
                    absent.setdefault(image_id, set()).add(word)
    labels = {}
    for image_id, facts in known.items():
        gone = absent.get(image_id, set())
        if "colour" not in facts and len(gone & set(COLORS)) == len(COLORS) - 1:
            facts["colour"] = (set(COLORS) - gone).pop()
        if "shape" not in facts and len(gone & set(SHAPES)) == len(SHAPES) - 1:
            facts["shape"] = (set(SHAPES) - gone).pop()
        labels[image_id] = (
            COLORS.index(facts["colour"]) if "colour" in facts else -100,
            SHAPES.index(facts["shape"]) if "shape" in facts else -100,
        )
    return labels


def _load_pretraining_data(recipe: Recipe) -> _Data:
    """All 4,000 easy-VQA train images (uint8 -> normalised), labels and dense patch targets."""
    import easy_vqa
    from PIL import Image

    questions, answers, image_ids = easy_vqa.get_train_questions()
    labels = image_labels(questions, answers, image_ids)
    paths = easy_vqa.get_train_image_paths()
    ids = sorted(paths)
    raw = []
    for image_id in ids:
        with Image.open(paths[image_id]) as image:
            rgb = image.convert("RGB")
            if rgb.size != (recipe.image_size, recipe.image_size):
                rgb = rgb.resize((recipe.image_size, recipe.image_size), Image.Resampling.BICUBIC)
            raw.append(np.asarray(rgb))
    pixels01 = torch.from_numpy(np.stack(raw)).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(_IMAGE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(_IMAGE_STD).view(1, 3, 1, 1)
    pixels = (pixels01 - mean) / std

    # Foreground: differs from the background colour (median of the four corners) by > 0.15.
    corners = torch.stack(
        [pixels01[:, :, 0, 0], pixels01[:, :, 0, -1], pixels01[:, :, -1, 0], pixels01[:, :, -1, -1]], dim=-1
    )
    background = corners.median(dim=-1).values[:, :, None, None]
    foreground = ((pixels01 - background).abs().amax(dim=1) > 0.15).float()  # [N, S, S]
    p = recipe.patch_size
    grid = recipe.image_size // p
    g = recipe.mask_grid
    sub = F.avg_pool2d(foreground[:, None], p // g)[:, 0]  # [N, g*grid, g*grid]
    patch_mask = sub.reshape(-1, grid, g, grid, g).permute(0, 1, 3, 2, 4).reshape(-1, grid * grid, g * g)
    fraction = F.avg_pool2d(foreground[:, None], p)[:, 0].flatten(1)  # [N, P]
    touches = (fraction > 0.02) & (fraction < 0.98) if recipe.boundary_only else fraction > 0.02

    colour = torch.tensor([labels.get(i, (-100, -100))[0] for i in ids])
    shape = torch.tensor([labels.get(i, (-100, -100))[1] for i in ids])
    patch_shape = shape[:, None].expand_as(touches).clone()
    patch_shape[~touches] = -100
    index = torch.arange(len(ids))
    return _Data(
        pixels=pixels,
        colour=colour,
        shape=shape,
        patch_shape=patch_shape,
        patch_mask=patch_mask,
        train=index[: recipe.pretrain_images],
        held_out=index[recipe.pretrain_images :],
    )


# ------------------------------------------------------------------------------- processor & model

_IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP, BlipImageProcessor's default
_IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def _vocabulary() -> list[str]:
    """The easy-VQA train questions/answers' words, prompt words and the special tokens, sorted."""
    import easy_vqa

    questions, answers, _ = easy_vqa.get_train_questions()
    words: set[str] = set(EXTRA_WORDS) | set(COLORS) | set(SHAPES)
    for text in list(questions) + list(answers):
        words.update(re.findall(r"\w+|[^\w\s]+", text.lower()))
    return [PAD, EOS, UNK] + sorted(words)


def _build_processor(recipe: Recipe):
    """A WordLevel tokenizer (no download) wrapped as T5 expects, plus a BlipImageProcessor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import BlipImageProcessor, Blip2Processor, PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # splits "shape?" into "shape", "?"
    core.post_processor = processors.TemplateProcessing(
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])]
    )
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=512
    )
    image_processor = BlipImageProcessor(
        size={"height": recipe.image_size, "width": recipe.image_size},
        image_mean=list(_IMAGE_MEAN),
        image_std=list(_IMAGE_STD),
    )
    # The processor adds the "<image>" token to the tokenizer itself (id = len(vocab)).
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=recipe.num_query_tokens)


def _image_token_id(processor) -> int:
    token = processor.image_token
    return processor.tokenizer.convert_tokens_to_ids(getattr(token, "content", token))


def _build_model(recipe: Recipe, processor):
    from transformers import (
        Blip2Config,
        Blip2ForConditionalGeneration,
        Blip2QFormerConfig,
        Blip2VisionConfig,
        T5Config,
    )

    vision = Blip2VisionConfig(
        hidden_size=recipe.vision_hidden,
        intermediate_size=2 * recipe.vision_hidden,
        num_hidden_layers=recipe.vision_layers,
        num_attention_heads=recipe.heads,
        image_size=recipe.image_size,
        patch_size=recipe.patch_size,
        initializer_range=0.02,  # default 1e-10 makes the patch embedding all zeros
    )
    qformer = Blip2QFormerConfig(
        hidden_size=recipe.vision_hidden,
        intermediate_size=2 * recipe.vision_hidden,
        num_hidden_layers=recipe.qformer_layers,
        num_attention_heads=recipe.heads,
        encoder_hidden_size=recipe.vision_hidden,
        cross_attention_frequency=1,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    tokenizer = processor.tokenizer
    text = T5Config(
        vocab_size=len(tokenizer),
        d_model=recipe.text_d_model,
        d_kv=recipe.text_d_model // recipe.heads,
        d_ff=recipe.text_ff,
        num_layers=recipe.text_layers,
        num_decoder_layers=recipe.text_layers,
        num_heads=recipe.heads,
        feed_forward_proj="gated-gelu",  # as Flan-T5
        dropout_rate=0.0,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    config = Blip2Config(
        vision_config=vision.to_dict(),
        qformer_config=qformer.to_dict(),
        text_config=text.to_dict(),
        num_query_tokens=recipe.num_query_tokens,
        image_token_index=_image_token_id(processor),
    )
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)  # _init_weights zeroes them
    model.generation_config.max_new_tokens = 8
    return model


# ----------------------------------------------------------------------------------- the two stages


def _qformer_output(model, pixels: torch.Tensor) -> torch.Tensor:
    vision = model.vision_model(pixel_values=pixels, return_dict=True).last_hidden_state
    queries = model.query_tokens.expand(pixels.shape[0], -1, -1)
    out = model.qformer(query_embeds=queries, encoder_hidden_states=vision, return_dict=True).last_hidden_state
    return out, vision


def _stage1(model, data: _Data, recipe: Recipe, log_every: int) -> dict[str, object]:
    """Train the image path so colour and shape are decodable from the projected query outputs."""
    d_model = recipe.text_d_model
    heads = nn.ModuleDict(
        {
            "colour": nn.Linear(d_model, len(COLORS)),
            "shape": nn.Linear(d_model, len(SHAPES)),
            "patch_shape": nn.Linear(recipe.vision_hidden, len(SHAPES)),
            "patch_mask": nn.Linear(recipe.vision_hidden, recipe.mask_grid**2),
        }
    )
    image_path = [model.vision_model, model.qformer, model.language_projection]
    params = [p for module in image_path for p in module.parameters()] + [model.query_tokens]
    params += list(heads.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.stage1_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.stage1_lr, total_steps=recipe.stage1_steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    model.train()
    losses: list[float] = []
    for step in range(1, recipe.stage1_steps + 1):
        batch = data.train[torch.randint(0, len(data.train), (recipe.stage1_batch,), generator=generator)]
        query_output, vision = _qformer_output(model, data.pixels[batch])
        pooled = model.language_projection(query_output).mean(dim=1)
        patches = vision[:, 1:]
        loss = (
            F.cross_entropy(heads["colour"](pooled), data.colour[batch], ignore_index=-100)
            + F.cross_entropy(heads["shape"](pooled), data.shape[batch], ignore_index=-100)
            + recipe.dense_weight
            * F.cross_entropy(
                heads["patch_shape"](patches).flatten(0, 1), data.patch_shape[batch].flatten(), ignore_index=-100
            )
            + recipe.mask_weight
            * F.binary_cross_entropy_with_logits(heads["patch_mask"](patches), data.patch_mask[batch])
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            log.info("stage 1 step %d/%d loss %.3f", step, recipe.stage1_steps, float(np.mean(losses[-log_every:])))
    model.eval()
    result: dict[str, object] = {"steps": recipe.stage1_steps, "final_loss": round(float(np.mean(losses[-50:])), 4)}
    with torch.no_grad():
        for split, index in (("train", data.train[:1000]), ("held_out", data.held_out)):
            pooled = model.language_projection(_qformer_output(model, data.pixels[index])[0]).mean(dim=1)
            for name, target in (("colour", data.colour[index]), ("shape", data.shape[index])):
                known = target >= 0
                accuracy = (heads[name](pooled).argmax(-1)[known] == target[known]).float().mean().item()
                result[f"{split}_{name}_accuracy"] = round(accuracy, 4)
    log.info(
        "stage 1 held-out accuracy: colour %.3f shape %.3f",
        result["held_out_colour_accuracy"],
        result["held_out_shape_accuracy"],
    )
    return result


def _captions(colour: torch.Tensor, shape: torch.Tensor, flip: torch.Tensor) -> list[str]:
    out = []
    for c, s, f in zip(colour.tolist(), shape.tolist(), flip.tolist()):
        words = [COLORS[c], SHAPES[s]]
        out.append(" ".join(reversed(words) if f else words))
    return out


def _stage2_examples(colour: torch.Tensor, shape: torch.Tensor, flip: torch.Tensor, recipe: Recipe, generator: torch.Generator) -> tuple[list[str], list[str]]:
    prompts, targets = [], []
    captions = _captions(colour, shape, flip)
    draws = torch.rand(len(colour), 3, generator=generator).tolist()
    words = ("yes", "no") if recipe.itm == "yes_no" else ("true", "false")
    for c, s, caption, (use_itm, about_shape, truth) in zip(colour.tolist(), shape.tolist(), captions, draws):
        if recipe.itm == "none" or use_itm >= recipe.itm_fraction:
            prompts.append(CAPTION_PROMPT)
            targets.append(caption)
            continue
        values, own = (SHAPES, s) if about_shape < 0.5 else (COLORS, c)
        if truth < 0.5:
            named = own
        else:
            named = (own + 1 + int((truth - 0.5) * 2 * (len(values) - 1))) % len(values)
        phrase = values[named] if values is SHAPES else f"{values[named]} shape"
        prompts.append(f"{CAPTION_PROMPT} a {phrase} .")
        targets.append(words[0] if named == own else words[1])
    return prompts, targets


def _stage2(model, processor, data: _Data, recipe: Recipe, log_every: int) -> dict[str, object]:
    """Caption generation: T5 + projection learn to say "blue circle" from the image tokens."""
    tokenizer = processor.tokenizer
    image_token = _image_token_id(processor)
    labelled = data.train[(data.colour[data.train] >= 0) & (data.shape[data.train] >= 0)]
    held = data.held_out[(data.colour[data.held_out] >= 0) & (data.shape[data.held_out] >= 0)]
    with torch.no_grad():
        cached = torch.cat([_qformer_output(model, data.pixels[chunk])[0] for chunk in labelled.split(500)])
        cached_held = _qformer_output(model, data.pixels[held])[0]
    prompt = _encode_prompts(processor, [CAPTION_PROMPT], image_token)
    for module in (model.vision_model, model.qformer):
        module.requires_grad_(False)
    model.query_tokens.requires_grad_(False)
    params = list(model.language_model.parameters()) + list(model.language_projection.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.stage2_lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=recipe.stage2_lr, total_steps=recipe.stage2_steps, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))
    model.language_model.train()
    losses: list[float] = []
    for step in range(1, recipe.stage2_steps + 1):
        pick = torch.randint(0, len(labelled), (recipe.stage2_batch,), generator=generator)
        index = labelled[pick]
        flip = torch.rand(len(pick), generator=generator) < 0.5 if recipe.random_order else torch.zeros(len(pick), dtype=torch.bool)
        prompts, targets = _stage2_examples(data.colour[index], data.shape[index], flip, recipe, generator)
        labels = tokenizer(targets, padding=True, return_tensors="pt")["input_ids"]
        labels[labels == tokenizer.pad_token_id] = -100
        batch_prompt = _encode_prompts(processor, prompts, image_token)
        embeds = _embed(model, batch_prompt["input_ids"], model.language_projection(cached[pick]), image_token)
        loss = model.language_model(inputs_embeds=embeds, attention_mask=batch_prompt["attention_mask"], labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            log.info("stage 2 step %d/%d loss %.3f", step, recipe.stage2_steps, float(np.mean(losses[-log_every:])))
    model.eval()
    result: dict[str, object] = {"steps": recipe.stage2_steps, "final_loss": round(float(np.mean(losses[-50:])), 4)}
    with torch.no_grad():
        features = model.language_projection(cached_held)
        embeds = _embed(model, prompt["input_ids"].expand(len(held), -1), features, image_token)
        generated = model.language_model.generate(
            inputs_embeds=embeds, attention_mask=prompt["attention_mask"].expand(len(held), -1), max_new_tokens=4
        )
        texts = tokenizer.batch_decode(generated, skip_special_tokens=True)
        words = [set(t.split()) for t in texts]
        colour_ok = [COLORS[c] in w for c, w in zip(data.colour[held].tolist(), words)]
        shape_ok = [SHAPES[s] in w for s, w in zip(data.shape[held].tolist(), words)]
        text_std = model.language_model.get_input_embeddings().weight.std().item()
    result["held_out_caption_colour_accuracy"] = round(float(np.mean(colour_ok)), 4)
    result["held_out_caption_shape_accuracy"] = round(float(np.mean(shape_ok)), 4)
    result["image_token_std"] = round(features.std().item(), 4)
    result["word_embedding_std"] = round(text_std, 4)
    log.info(
        "stage 2 held-out captions: colour %.3f shape %.3f (image-token std %.2f, word std %.2f)",
        result["held_out_caption_colour_accuracy"],
        result["held_out_caption_shape_accuracy"],
        result["image_token_std"],
        text_std,
    )
    return result


def _encode_prompts(processor, prompts: list[str], image_token: int) -> dict[str, torch.Tensor]:
    """Image tokens in front of the tokenised prompt, as `Blip2Processor` lays them out."""
    batch = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    image_ids = torch.full((len(prompts), processor.num_query_tokens), image_token, dtype=torch.long)
    return {
        "input_ids": torch.cat([image_ids, batch["input_ids"]], dim=1),
        "attention_mask": torch.cat([torch.ones_like(image_ids), batch["attention_mask"]], dim=1),
    }


def _embed(model, input_ids: torch.Tensor, features: torch.Tensor, image_token: int) -> torch.Tensor:
    embeddings = model.language_model.get_input_embeddings()(input_ids)
    mask = (input_ids == image_token).unsqueeze(-1).expand_as(embeddings)
    return embeddings.masked_scatter(mask, features.to(embeddings.dtype))


def _check_round_trip(model, output_dir: Path, data: _Data) -> None:
    """Load the saved pair back and check it reproduces the in-memory model's logits and generates."""
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    loaded = Blip2ForConditionalGeneration.from_pretrained(output_dir).eval()
    processor = Blip2Processor.from_pretrained(output_dir)
    pixels01 = data.pixels[:2] * torch.tensor(_IMAGE_STD).view(1, 3, 1, 1) + torch.tensor(_IMAGE_MEAN).view(1, 3, 1, 1)
    images = [
        Image.fromarray((p.permute(1, 2, 0).numpy() * 255.0).round().clip(0, 255).astype(np.uint8))
        for p in pixels01
    ]
    inputs = processor(images=images, text=["Question: what color is the shape? Answer:"] * 2, return_tensors="pt")
    if not torch.allclose(inputs["pixel_values"], data.pixels[:2], atol=1e-4):
        raise RuntimeError("tiny BLIP-2: the saved image processor does not reproduce the pre-training pixels")
    labels = processor.tokenizer(["blue", "circle"], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        expected = model(**inputs, labels=labels).logits
        got = loaded(**inputs, labels=labels).logits
        generated = loaded.generate(**inputs, max_new_tokens=4)
    if not torch.allclose(expected, got, atol=1e-5):
        raise RuntimeError("tiny BLIP-2: from_pretrained does not reproduce the saved model")
    if generated.shape[0] != 2:
        raise RuntimeError("tiny BLIP-2: generate returned an unexpected shape")
