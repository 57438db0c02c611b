"""The offline tiny BLIP-2 (Flan-T5 style): built from a config, then pre-trained for ~1.5 CPU minutes.

Tests and the quick-start need a BLIP-2 that loads through exactly the code path of
`Salesforce/blip2-flan-t5-xl` without a download, and that *looks at the image*: a LoRA fine-tune of
its language model on easy-VQA must score clearly higher with each question's own image than with a
shuffled one. A randomly initialised tiny BLIP-2 does not (LoRA learns the question prior only:
../shared/FACTS.md), so the recipe pre-trains it, as BLIP-2 itself was pre-trained, on easy-VQA *train*
images 0..2999 (3000..3999 are held out for the accuracies in TINY_MODEL.json; questions and the test
split are never read):

- Stage 1, the image path (ViT, Q-Former, query tokens, projection): linear heads on the mean projected
  query output classify each image's colour and shape; two dense losses on the ViT's patch tokens
  (the shape under each outline patch, each patch's 4x4 foreground raster) make shape learnable in
  1,200 steps (held-out shape 0.89-0.96 over 5 seeds, colour 0.99). The heads are discarded.
- Stage 2, image-grounded generation through T5 (all weights + projection, image path frozen): half
  captioning ("a picture of" -> "blue circle", words in random order), half image-text matching as
  generation ("a circle ." -> yes/no). Without the matching half yes/no stayed at the question prior.

A LoRA fine-tune as `runner.train` does it (r=8, lr 3e-3, 3 epochs over 2,000 questions) then scores
~91% exact match with each question's own image against ~67% with shuffled images (seed 0).

Traps handled (FACTS.md): `Blip2VisionConfig.initializer_range` defaults to 1e-10 (a blind model), so
it is set to 0.02; `_init_weights` zeroes `query_tokens`, so they are re-drawn; the processor adds the
`<image>` token itself and `image_token_index` is set to its id; T5Config ties the embeddings.

The built model ships in `runner/tiny/artifact/` (see runner/tiny/__init__.py). Bump TINY_VERSION
whenever the recipe or the tokenizer changes, and regenerate the artifact: `python -m runner.tiny`.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from runner.model.blip2 import (
    encode_answers,
    encode_prompts,
    image_token_id,
    text_embeddings,
)
from runner.tiny import TINY_VERSION

if TYPE_CHECKING:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

log = logging.getLogger(__name__)
CPU = torch.device("cpu")  # the build always runs on CPU (deterministic, and GPU-less machines need it)


COLORS = ("red", "green", "blue", "black", "gray", "teal", "yellow", "brown")
SHAPES = ("circle", "rectangle", "triangle")
CAPTION_PROMPT = "a picture of"
# Image-text matching statements; {x} is "blue shape" or "circle" (the questions' own phrasing).
ITM_TEMPLATES = (
    CAPTION_PROMPT + " a {x} .",
    "a {x} .",
    CAPTION_PROMPT + " a {x} in the image .",
    "the image : a {x} .",
)
# Words the tokenizer knows besides the easy-VQA questions/answers: the QA prompt and the
# pre-training prompts ("Question: ... Answer:", "a picture of", "the image : a circle .").
EXTRA_WORDS = ("question", "answer", ":", ".", "picture")
PAD, EOS, UNK = "<pad>", "</s>", "<unk>"  # ids 0, 1, 2 as in T5
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP: BlipImageProcessor's defaults
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)
NO_LABEL = -100


@dataclass(frozen=True)
class Recipe:
    """Every number of the build; written to TINY_MODEL.json."""

    image_size: int = 64  # the easy-VQA images' own size: the processor's resize is a no-op
    patch_size: int = 8  # 64 patches
    vision_hidden: int = 64  # ViT and Q-Former width (Q-Former cross-attends the ViT directly)
    vision_layers: int = 2
    qformer_layers: int = 2
    heads: int = 4
    num_query_tokens: int = 8
    text_d_model: int = 64  # 128 was slower and no better after LoRA
    text_layers: int = 2  # encoder and decoder each
    text_ff: int = 128
    pretrain_images: int = 3000  # train images 0..N-1 pre-train; the rest of train is held out
    stage1_steps: int = 1200
    stage1_batch: int = 32
    stage1_lr: float = 3e-3
    mask_grid: int = 4  # each patch predicts its foreground on a mask_grid x mask_grid raster
    stage2_steps: int = 500
    stage2_batch: int = 64
    stage2_lr: float = 2e-3
    itm_fraction: float = 0.5  # share of stage-2 examples that are matching statements
    threads: int = 2  # fixed, so the build is the same wherever it runs (float summation order)


def build_tiny_blip2(output_dir: Path, *, seed: int = 0, log_every: int = 100) -> Path:
    """Build, pre-train and save the tiny BLIP-2 + processor into `output_dir`; return it.

    Deterministic for a seed (on a given CPU type; it uses 2 threads whatever the machine has).
    Takes ~2 minutes on 2 idle CPU cores. `Blip2ForConditionalGeneration.from_pretrained(output_dir)`
    and `Blip2Processor.from_pretrained(output_dir)` load the result; `TINY_MODEL.json` records the
    recipe, the pre-training losses/accuracies and the time taken. The files are written to a
    sibling temporary directory first and moved in at the end, `config.json` last, so a crashed
    build never leaves a directory that looks complete. The caller's RNG state is left untouched.
    """
    return build_with_recipe(Path(output_dir), Recipe(), seed=seed, log_every=log_every)


def build_with_recipe(output_dir: Path, recipe: Recipe, *, seed: int = 0, log_every: int = 100) -> Path:
    """`build_tiny_blip2` with an explicit recipe (for experiments; the default is `Recipe()`)."""
    output_dir = Path(output_dir)
    started = time.perf_counter()
    previous_threads = torch.get_num_threads()
    staging = output_dir.parent / f".{output_dir.name}.building-{os.getpid()}"
    try:
        torch.set_num_threads(recipe.threads)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            report = _build(staging, recipe, seed, log_every)
        report["seconds"] = round(time.perf_counter() - started, 1)
        report["files"] = file_hashes(staging)
        (staging / "TINY_MODEL.json").write_text(json.dumps(report, indent=2) + "\n")
        _move_into(staging, output_dir)
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(staging, ignore_errors=True)
    log.info("tiny BLIP-2 built in %.1f s into %s", report["seconds"], output_dir)
    return output_dir


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of each weight and tokenizer file: what `runner.tiny.model_dir` verifies on load."""
    import hashlib

    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in sorted(folder.iterdir())
            if path.is_file() and path.name != "TINY_MODEL.json"}


def quality_gate(report: dict[str, Any], margin: float = 0.3) -> list[str]:
    """What makes a build unusable: captions that name the image's colour no more often with its own
    image than with another's (the model ignores the image); empty when the build passes."""
    own = report["stage2"]["held_out_caption_colour_accuracy"]
    shuffled = report["stage2"]["held_out_caption_colour_accuracy_shuffled"]
    if own < shuffled + margin:
        return [f"held-out caption colour accuracy {own:.3f} is not {margin} above the shuffled-image "
                f"control's {shuffled:.3f}"]
    return []


def _build(staging: Path, recipe: Recipe, seed: int, log_every: int) -> dict[str, Any]:
    import transformers

    data = _load_pretraining_data(recipe)
    processor = _build_processor(recipe)
    model = _build_model(recipe, processor)
    report: dict[str, Any] = {
        "tiny_version": TINY_VERSION,
        "seed": seed,
        "recipe": asdict(recipe),
        "pretraining_images": f"easy_vqa train ids 0..{recipe.pretrain_images - 1}",
        "held_out_images": f"easy_vqa train ids {recipe.pretrain_images}..{len(data.colour) - 1}",
        "parameters": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for name, stage in (("stage1", _stage1), ("stage2", _stage2)):
        t0 = time.perf_counter()
        report[name] = stage(model, processor, data, recipe, log_every)
        report[name]["seconds"] = round(time.perf_counter() - t0, 1)
    model.eval()
    failed = quality_gate(report)
    if failed:
        raise RuntimeError(f"tiny BLIP-2: the build fails its quality gate: {'; '.join(failed)}")
    staging.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(staging)
    processor.save_pretrained(staging)
    _check_round_trip(model, staging, data)
    return report


def _move_into(staging: Path, output_dir: Path) -> None:
    """Move the staged files into `output_dir` (created if needed), config.json last."""
    output_dir.mkdir(parents=True, exist_ok=True)
    files = sorted(staging.iterdir(), key=lambda path: path.name == "config.json")
    for path in files:
        os.replace(path, output_dir / path.name)


# --------------------------------------------------------------------------------------------- data


@dataclass
class _Data:
    pixels: torch.Tensor  # [N, 3, S, S] normalised exactly as the saved image processor does
    colour: torch.Tensor  # [N] index into COLORS, NO_LABEL if unknown
    shape: torch.Tensor  # [N] index into SHAPES, NO_LABEL if unknown
    patch_shape: torch.Tensor  # [N, P] shape label of patches the outline crosses, else NO_LABEL
    patch_mask: torch.Tensor  # [N, P, g*g] foreground fraction on a g x g raster inside each patch
    train: torch.Tensor  # image indices used for pre-training
    held_out: torch.Tensor  # image indices held out


def image_labels(
    questions: Sequence[str], answers: Sequence[str], image_ids: Sequence[int]
) -> dict[int, tuple[int, int]]:
    """Per-image (colour, shape) indices derived from easy-VQA questions/answers (NO_LABEL: unknown).

    Open questions give the attribute directly; yes/no questions give it when the answer says the
    named colour/shape is present ("is there not a circle?" -> "no"), and by elimination when all
    others are said to be absent. On the train split this labels 3,567 colours and 3,631 shapes of
    4,000 images, with no contradiction between the two sources.
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
        words = question.lower().rstrip("?").split()
        negated = "not" in words or words[:2] == ["is", "no"]
        present = (answer == "yes") != negated
        for word in words:
            if word in COLORS or word in SHAPES:
                if present:
                    facts["colour" if word in COLORS else "shape"] = word
                else:
                    absent.setdefault(image_id, set()).add(word)
    labels = {}
    for image_id, facts in known.items():
        gone = absent.get(image_id, set())
        for kind, values in (("colour", COLORS), ("shape", SHAPES)):
            left = set(values) - gone
            if kind not in facts and len(left) == 1:
                facts[kind] = left.pop()
        labels[image_id] = (
            COLORS.index(facts["colour"]) if "colour" in facts else NO_LABEL,
            SHAPES.index(facts["shape"]) if "shape" in facts else NO_LABEL,
        )
    return labels


def _load_pretraining_data(recipe: Recipe) -> _Data:
    """The 4,000 easy-VQA train images (normalised), their labels and the dense patch targets."""
    import easy_vqa
    from PIL import Image

    questions, answers, image_ids = easy_vqa.get_train_questions()
    labels = image_labels(questions, answers, image_ids)
    paths = easy_vqa.get_train_image_paths()
    ids = sorted(paths)
    size = (recipe.image_size, recipe.image_size)
    raw = []
    for image_id in ids:
        with Image.open(paths[image_id]) as image:
            rgb = image.convert("RGB")
        raw.append(np.asarray(rgb if rgb.size == size else rgb.resize(size, Image.Resampling.BICUBIC)))
    pixels01 = torch.from_numpy(np.stack(raw)).permute(0, 3, 1, 2).float() / 255.0
    pixels = (pixels01 - torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGE_STD).view(1, 3, 1, 1)

    # Foreground: differs from the background colour (median of the four corners) by > 0.15.
    corners = pixels01[:, :, [0, 0, -1, -1], [0, -1, 0, -1]]  # [N, 3, 4]
    background = corners.median(dim=-1).values[:, :, None, None]
    foreground = ((pixels01 - background).abs().amax(dim=1) > 0.15).float()[:, None]  # [N, 1, S, S]
    p, g = recipe.patch_size, recipe.mask_grid
    grid = recipe.image_size // p
    raster = F.avg_pool2d(foreground, p // g)[:, 0]  # [N, g*grid, g*grid]
    patch_mask = raster.reshape(-1, grid, g, grid, g).permute(0, 1, 3, 2, 4).reshape(-1, grid * grid, g * g)
    fraction = F.avg_pool2d(foreground, p).flatten(1)  # [N, P]
    outline = (fraction > 0.02) & (fraction < 0.98)

    colour = torch.tensor([labels.get(i, (NO_LABEL, NO_LABEL))[0] for i in ids])
    shape = torch.tensor([labels.get(i, (NO_LABEL, NO_LABEL))[1] for i in ids])
    patch_shape = torch.where(outline, shape[:, None], torch.full_like(outline, NO_LABEL, dtype=torch.long))
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


def _vocabulary() -> list[str]:
    """Special tokens, then the easy-VQA train questions'/answers' words and EXTRA_WORDS, sorted."""
    import easy_vqa

    questions, answers, _ = easy_vqa.get_train_questions()
    words: set[str] = set(EXTRA_WORDS) | set(COLORS) | set(SHAPES)
    for text in list(questions) + list(answers):
        words.update(re.findall(r"\w+|[^\w\s]+", text.lower()))
    return [PAD, EOS, UNK] + sorted(words)


def _build_processor(recipe: Recipe) -> Blip2Processor:
    """A WordLevel tokenizer (no download) laid out as T5's, plus a BlipImageProcessor."""
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
    )
    from transformers import Blip2Processor, BlipImageProcessor, PreTrainedTokenizerFast

    vocab = {word: index for index, word in enumerate(_vocabulary())}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()  # "shape?" -> "shape", "?"
    core.post_processor = processors.TemplateProcessing(  # T5 appends </s>
        single=f"$A {EOS}", pair=f"$A {EOS} $B {EOS}", special_tokens=[(EOS, vocab[EOS])]
    )
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token=PAD, eos_token=EOS, unk_token=UNK, model_max_length=512
    )
    image_processor = BlipImageProcessor(
        size={"height": recipe.image_size, "width": recipe.image_size},
        image_mean=list(IMAGE_MEAN),
        image_std=list(IMAGE_STD),
    )
    # The processor adds the "<image>" token to the tokenizer itself (id = len(vocab)).
    return Blip2Processor(image_processor, tokenizer, num_query_tokens=recipe.num_query_tokens)


def _build_model(recipe: Recipe, processor: Blip2Processor) -> Blip2ForConditionalGeneration:
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
        initializer_range=0.02,  # the default 1e-10 makes the patch embedding all zeros
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
        vocab_size=len(tokenizer),  # includes the processor's <image> token
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
        image_token_index=image_token_id(processor),
    )
    model = Blip2ForConditionalGeneration(config)
    with torch.no_grad():
        model.query_tokens.normal_(0.0, 0.02)  # _init_weights zeroes them
    return model


# ----------------------------------------------------------------------------------- the two stages


def _image_path(model: Blip2ForConditionalGeneration, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q-Former output [B, queries, hidden], ViT output [B, 1 + patches, hidden])."""
    vision = model.vision_model(pixel_values=pixels, return_dict=True).last_hidden_state
    queries = model.query_tokens.expand(pixels.shape[0], -1, -1)
    output = model.qformer(query_embeds=queries, encoder_hidden_states=vision, return_dict=True)
    return output.last_hidden_state, vision


def _train(
    name: str, params: list[nn.Parameter], lr: float, steps: int, loss_at: Callable[[int], torch.Tensor],
    log_every: int,
) -> dict[str, Any]:
    """AdamW with a one-cycle schedule; `loss_at(step)` computes one batch's loss."""
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    losses: list[float] = []
    for step in range(1, steps + 1):
        loss = loss_at(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if log_every and step % log_every == 0:
            log.info("tiny BLIP-2 %s step %d/%d loss %.3f", name, step, steps, np.mean(losses[-log_every:]))
    return {"steps": steps, "final_loss": round(float(np.mean(losses[-50:])), 4)}


def _stage1(
    model: Blip2ForConditionalGeneration, processor: Blip2Processor, data: _Data, recipe: Recipe, log_every: int
) -> dict[str, Any]:
    """Train the image path so colour and shape are decodable from the projected query outputs."""
    heads = nn.ModuleDict(
        {
            "colour": nn.Linear(recipe.text_d_model, len(COLORS)),
            "shape": nn.Linear(recipe.text_d_model, len(SHAPES)),
            "patch_shape": nn.Linear(recipe.vision_hidden, len(SHAPES)),
            "patch_mask": nn.Linear(recipe.vision_hidden, recipe.mask_grid**2),
        }
    )
    params = [model.query_tokens, *heads.parameters()]
    for module in (model.vision_model, model.qformer, model.language_projection):
        params += list(module.parameters())
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))

    def loss_at(step: int) -> torch.Tensor:
        batch = data.train[torch.randint(0, len(data.train), (recipe.stage1_batch,), generator=generator)]
        query_output, vision = _image_path(model, data.pixels[batch])
        pooled = model.language_projection(query_output).mean(dim=1)
        patches = vision[:, 1:]  # without the class token
        patch_logits = heads["patch_shape"](patches).flatten(0, 1)
        return (
            F.cross_entropy(heads["colour"](pooled), data.colour[batch], ignore_index=NO_LABEL)
            + F.cross_entropy(heads["shape"](pooled), data.shape[batch], ignore_index=NO_LABEL)
            + F.cross_entropy(patch_logits, data.patch_shape[batch].flatten(), ignore_index=NO_LABEL)
            + F.binary_cross_entropy_with_logits(heads["patch_mask"](patches), data.patch_mask[batch])
        )

    model.train()
    result = _train("stage 1", params, recipe.stage1_lr, recipe.stage1_steps, loss_at, log_every)
    model.eval()
    with torch.no_grad():
        for split, index in (("train", data.train[:1000]), ("held_out", data.held_out)):
            pooled = model.language_projection(_image_path(model, data.pixels[index])[0]).mean(dim=1)
            for name, target in (("colour", data.colour[index]), ("shape", data.shape[index])):
                known = target != NO_LABEL
                predicted = heads[name](pooled).argmax(-1)
                result[f"{split}_{name}_accuracy"] = _mean((predicted[known] == target[known]).tolist())
    log.info(
        "tiny BLIP-2 stage 1: held-out colour accuracy %.3f, shape accuracy %.3f",
        result["held_out_colour_accuracy"],
        result["held_out_shape_accuracy"],
    )
    return result


def _stage2_examples(
    colour: list[int], shape: list[int], generator: torch.Generator, itm_fraction: float
) -> tuple[list[str], list[str]]:
    """(prompt, target) per image: a caption in random word order, or a matching statement."""
    prompts, targets = [], []
    draws = torch.rand(len(colour), 4, generator=generator).tolist()
    for c, s, (task, attribute, truth, order) in zip(colour, shape, draws):
        if task >= itm_fraction:
            words = [COLORS[c], SHAPES[s]]
            prompts.append(CAPTION_PROMPT)
            targets.append(" ".join(reversed(words) if order < 0.5 else words))
            continue
        values, own = (SHAPES, s) if attribute < 0.5 else (COLORS, c)
        named = own if truth < 0.5 else (own + 1 + int((truth - 0.5) * 2 * (len(values) - 1))) % len(values)
        phrase = values[named] if values is SHAPES else f"{values[named]} shape"
        template = ITM_TEMPLATES[min(int(order * len(ITM_TEMPLATES)), len(ITM_TEMPLATES) - 1)]
        prompts.append(template.format(x=phrase))
        targets.append("yes" if named == own else "no")
    return prompts, targets


def _stage2(
    model: Blip2ForConditionalGeneration, processor: Blip2Processor, data: _Data, recipe: Recipe, log_every: int
) -> dict[str, Any]:
    """Captioning + image-text matching through T5; the image path up to the Q-Former is frozen."""
    image_token = image_token_id(processor)
    both = (data.colour != NO_LABEL) & (data.shape != NO_LABEL)
    train, held = data.train[both[data.train]], data.held_out[both[data.held_out]]
    with torch.no_grad():
        cached = torch.cat([_image_path(model, data.pixels[chunk])[0] for chunk in train.split(500)])
        cached_held = _image_path(model, data.pixels[held])[0]
    model.requires_grad_(False)
    params = [*model.language_model.parameters(), *model.language_projection.parameters()]
    for param in params:
        param.requires_grad_(True)
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ()).item()))

    def loss_at(step: int) -> torch.Tensor:
        pick = torch.randint(0, len(train), (recipe.stage2_batch,), generator=generator)
        colours, shapes = data.colour[train[pick]].tolist(), data.shape[train[pick]].tolist()
        prompts, targets = _stage2_examples(colours, shapes, generator, recipe.itm_fraction)
        inputs = encode_prompts(processor, prompts, CPU)
        embeds = text_embeddings(model, inputs["input_ids"], model.language_projection(cached[pick]), image_token)
        labels = encode_answers(processor, targets, CPU)
        return model.language_model(
            inputs_embeds=embeds, attention_mask=inputs["attention_mask"], labels=labels
        ).loss

    model.language_model.train()
    result = _train("stage 2", params, recipe.stage2_lr, recipe.stage2_steps, loss_at, log_every)
    model.eval()
    model.requires_grad_(True)
    with torch.no_grad():
        features = model.language_projection(cached_held)
        colours, shapes = data.colour[held].tolist(), data.shape[held].tolist()
        captions = [set(c.split()) for c in _generate(model, processor, [CAPTION_PROMPT] * len(held), features)]
        result["held_out_caption_colour_accuracy"] = _mean(COLORS[c] in w for c, w in zip(colours, captions))
        result["held_out_caption_shape_accuracy"] = _mean(SHAPES[s] in w for s, w in zip(shapes, captions))
        # The control: each caption generated from another image's features must miss the colour.
        shuffled = [set(c.split()) for c in _generate(model, processor, [CAPTION_PROMPT] * len(held),
                                                      features.roll(1, dims=0))]
        result["held_out_caption_colour_accuracy_shuffled"] = _mean(COLORS[c] in w for c, w in zip(colours, shuffled))
        check = torch.Generator().manual_seed(0)
        prompts, targets = _stage2_examples(colours, shapes, check, itm_fraction=1.0)
        answers = _generate(model, processor, prompts, features)
        result["held_out_matching_accuracy"] = _mean(a.strip() == t for a, t in zip(answers, targets))
        result["image_token_std"] = round(features.std().item(), 3)
        word_embeddings = model.language_model.get_input_embeddings().weight
        result["word_embedding_std"] = round(word_embeddings.std().item(), 3)
    log.info(
        "tiny BLIP-2 stage 2: held-out captions name the colour %.3f / shape %.3f, matching %.3f",
        result["held_out_caption_colour_accuracy"],
        result["held_out_caption_shape_accuracy"],
        result["held_out_matching_accuracy"],
    )
    return result


def _mean(values: Iterable[bool]) -> float:
    return round(float(np.mean(list(values))), 4)


def _generate(
    model: Blip2ForConditionalGeneration, processor: Blip2Processor, prompts: list[str], features: torch.Tensor
) -> list[str]:
    """Greedy generation from cached image features, decoded."""
    image_token = image_token_id(processor)
    inputs = encode_prompts(processor, prompts, CPU)
    generated = model.language_model.generate(
        inputs_embeds=text_embeddings(model, inputs["input_ids"], features, image_token),
        attention_mask=inputs["attention_mask"],
        max_new_tokens=4,
        do_sample=False,
        num_beams=1,
    )
    return processor.tokenizer.batch_decode(generated, skip_special_tokens=True)


def _check_round_trip(model: Blip2ForConditionalGeneration, saved: Path, data: _Data) -> None:
    """The saved pair must load back, reproduce the pixels and logits, and run `generate`."""
    from PIL import Image
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    loaded = Blip2ForConditionalGeneration.from_pretrained(saved).eval()
    processor = Blip2Processor.from_pretrained(saved)
    if (
        processor.num_query_tokens != loaded.config.num_query_tokens
        or image_token_id(processor) != loaded.config.image_token_index
    ):
        raise RuntimeError("tiny BLIP-2: the saved processor's image tokens do not match the model")
    mean, std = torch.tensor(IMAGE_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGE_STD).view(1, 3, 1, 1)
    pixels255 = ((data.pixels[:2] * std + mean) * 255.0).round().clip(0, 255)
    images = [Image.fromarray(p.permute(1, 2, 0).numpy().astype(np.uint8)) for p in pixels255]
    prompt = "Question: what color is the shape? Answer:"
    inputs = processor(images=images, text=[prompt] * 2, return_tensors="pt")
    if not torch.allclose(inputs["pixel_values"], data.pixels[:2], atol=1e-4):
        raise RuntimeError("tiny BLIP-2: the saved image processor does not reproduce the training pixels")
    labels = encode_answers(processor, ["blue", "circle"], CPU)
    with torch.no_grad():
        expected = model(**inputs, labels=labels).logits
        got = loaded(**inputs, labels=labels).logits
        generated = loaded.generate(**inputs, max_new_tokens=4)
    if not torch.allclose(expected, got, atol=1e-5):
        raise RuntimeError("tiny BLIP-2: from_pretrained does not reproduce the saved model's logits")
    if generated.ndim != 2 or generated.shape[0] != 2:
        raise RuntimeError(f"tiny BLIP-2: generate returned shape {tuple(generated.shape)}")
