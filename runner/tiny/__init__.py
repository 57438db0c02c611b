"""The offline tiny BLIP-2 that tests and the quick-start use: a versioned artifact shipped in the package.

`runner/tiny/artifact/` holds what `recipe.build_tiny_blip2` produced (safetensors, tokenizer, processor,
TINY_MODEL.json with the recipe, its quality numbers and each file's sha256), so no machine rebuilds it.
`model_dir()` verifies it before anything loads it: a recipe changed since the artifact was built, a
version bump without a rebuild, or a damaged file is an error that says how to regenerate:

    python -m runner.tiny            # rebuild runner/tiny/artifact/ (~1.5 min on 2 CPU cores)
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

from runner.errors import UserError

TINY_MODEL = "tiny"  # the name a config uses
TINY_VERSION = "2"  # bump with any change to the recipe or the tokenizer; then regenerate the artifact
ARTIFACT = Path(__file__).with_name("artifact")
REGENERATE = "regenerate it with `python -m runner.tiny`"


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


@functools.cache
def model_dir() -> Path:
    """The shipped tiny model's directory, verified against the current recipe and its file hashes."""
    manifest_file = ARTIFACT / "TINY_MODEL.json"
    if not manifest_file.exists():
        raise UserError(f"model: the tiny model artifact {ARTIFACT} is missing; {REGENERATE}")
    stale = stale_reasons(json.loads(manifest_file.read_text()))
    if stale:
        raise UserError(f"model: the tiny model artifact {ARTIFACT} is stale ({'; '.join(stale)}); {REGENERATE}")
    return ARTIFACT


def stale_reasons(manifest: dict) -> list[str]:
    """Why an artifact with this manifest is not the current recipe's build (empty: it is)."""
    reasons = []
    if manifest.get("tiny_version") != TINY_VERSION:
        reasons.append(f"built as version {manifest.get('tiny_version')}, the recipe is version {TINY_VERSION}")
    if manifest.get("recipe") != asdict(Recipe()):
        reasons.append("built with other recipe settings")
    for name, digest in manifest.get("files", {}).items():
        path = ARTIFACT / name
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            reasons.append(f"{name} differs from the build")
    if not manifest.get("files"):
        reasons.append("no file hashes recorded")
    return reasons
