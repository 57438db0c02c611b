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
from dataclasses import asdict
from pathlib import Path

from runner.errors import UserError

TINY_MODEL = "tiny"  # the name a config uses
TINY_VERSION = "2"  # bump with any change to the recipe or the tokenizer; then regenerate the artifact
ARTIFACT = Path(__file__).with_name("artifact")
REGENERATE = "regenerate it with `python -m runner.tiny`"


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
    from runner.tiny.recipe import Recipe

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
