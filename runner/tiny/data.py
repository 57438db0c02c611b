"""The tiny model's pre-training data: easy-VQA train images with per-image colour/shape labels and
patch targets derived from the package's own questions and pixels (runner/tiny/recipe.py says why)."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from runner.tiny import Recipe
from runner.tiny.recipe import (
    COLORS,
    EOS,
    EXTRA_WORDS,
    IMAGE_MEAN,
    IMAGE_STD,
    NO_LABEL,
    PAD,
    SHAPES,
    UNK,
)

log = logging.getLogger(__name__)



@dataclass
class PretrainingData:
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


def load_pretraining_data(recipe: Recipe) -> PretrainingData:
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
    return PretrainingData(
        pixels=pixels,
        colour=colour,
        shape=shape,
        patch_shape=patch_shape,
        patch_mask=patch_mask,
        train=index[: recipe.pretrain_images],
        held_out=index[recipe.pretrain_images :],
    )

def vocabulary() -> list[str]:
    """Special tokens, then the easy-VQA train questions'/answers' words and EXTRA_WORDS, sorted."""
    import easy_vqa

    questions, answers, _ = easy_vqa.get_train_questions()
    words: set[str] = set(EXTRA_WORDS) | set(COLORS) | set(SHAPES)
    for text in list(questions) + list(answers):
        words.update(re.findall(r"\w+|[^\w\s]+", text.lower()))
    return [PAD, EOS, UNK] + sorted(words)
