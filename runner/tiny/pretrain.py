"""The tiny model's construction and its two pre-training stages (runner/tiny/recipe.py says why)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
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
from runner.tiny import Recipe
from runner.tiny.data import PretrainingData, vocabulary
from runner.tiny.recipe import (
    CAPTION_PROMPT,
    COLORS,
    CPU,
    EOS,
    IMAGE_MEAN,
    IMAGE_STD,
    ITM_TEMPLATES,
    NO_LABEL,
    PAD,
    SHAPES,
    UNK,
)

if TYPE_CHECKING:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

log = logging.getLogger(__name__)





def build_processor(recipe: Recipe) -> Blip2Processor:
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

    vocab = {word: index for index, word in enumerate(vocabulary())}
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


def build_model(recipe: Recipe, processor: Blip2Processor) -> Blip2ForConditionalGeneration:
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


def stage1(
    model: Blip2ForConditionalGeneration, processor: Blip2Processor, data: PretrainingData, recipe: Recipe, log_every: int
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


def stage2(
    model: Blip2ForConditionalGeneration, processor: Blip2Processor, data: PretrainingData, recipe: Recipe, log_every: int
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

