"""The frozen image path's outputs (ViT → Q-Former → projection), computed once per image and kept.

LoRA on the Flan-T5 layers leaves these outputs depending on the image and the base model alone: a trial
computes them once for all its epochs, and `FeatureCache` keeps them on the node's disk so the other trials
of a sweep, validation, test scoring and the stage runs on that node load them instead. A trial whose LoRA
adapts the Q-Former (`lora_targets` with `query`/`key`/`value`) keeps only what stays frozen, the vision
tower's output (`vision_only`), and runs the Q-Former and projection at every step.

A cached entry is keyed by everything that changes the numbers: the model (hub id + resolved commit,
or a local directory + its weight files' size and mtime), precision, compute dtype, the image
processor's settings, the transformers/bitsandbytes versions — and the image's content hash (the
`image_key` every task already gives its images). Files are written to a temporary name and renamed,
so trials sharing a node never read a half-written entry, and computing is done under the cache's lock:
trials that start together on a node compute each image once (the others wait, then read the entries).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from runner import exiting
from runner.model.blip2 import image_features, query_features, vision_features
from runner.model.node_lock import node_lock

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin")


@dataclass
class ImageFeatures:
    """Frozen image-path outputs for a set of images, one row per image key."""

    index: dict[str, int]
    values: torch.Tensor  # [n_images, num_query_tokens, d_model]; vision_only: [n_images, patches + 1, hidden]
    vision_only: bool = False  # the Q-Former trains: rows are the vision tower's output

    def lookup(self, keys: list[str]) -> torch.Tensor:
        return self.values[[self.index[key] for key in keys]]

    def language_inputs(self, model, keys: list[str]) -> torch.Tensor:
        """The image features the language model is fed for `keys` ([batch, queries, d_model]): the rows
        themselves, or the rows through the (LoRA-adapted) Q-Former and projection."""
        rows = self.lookup(keys)
        return query_features(model, rows) if self.vision_only else rows


class FeatureCache:
    """One safetensors file per image under `root/<model identity>/`."""

    def __init__(self, root: Path, identity: dict):
        self.identity = identity
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]
        self.directory = root / digest

    def path(self, image_key: str) -> Path:
        return self.directory / image_key[:2] / f"{image_key}.safetensors"

    def load(self, image_key: str) -> torch.Tensor | None:
        """The entry, or None when there is none — or when it cannot be read (a damaged disk, a file
        copied in by hand): the image is then computed again and the entry rewritten, with a warning."""
        path = self.path(image_key)
        if not path.exists():
            return None
        try:
            return load_file(path)["features"]
        except (SafetensorError, OSError, KeyError) as error:
            log.warning("image-feature cache: %s is unreadable (%s); computing it again", path, error)
            return None

    def computing(self):
        """Held while computing entries: one trial of a node computes, the others wait."""
        return node_lock(self.directory / ".lock",
                         f"image features: waiting for another trial computing them into {self.directory}")

    def save(self, image_key: str, features: torch.Tensor) -> None:  # features: on the CPU
        path = self.path(image_key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if not (self.directory / "identity.json").exists():  # what the entries belong to, for people
            write_atomically(self.directory / "identity.json",
                             lambda tmp: tmp.write_text(json.dumps(self.identity, indent=2)))
        write_atomically(path, lambda tmp: save_file({"features": features.contiguous()}, str(tmp)))


def write_atomically(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(temporary)
    os.replace(temporary, path)


def feature_cache(root: Path, model: str, revision: str | None, precision: str, dtype: torch.dtype,
                  loaded, processor, vision_only: bool = False) -> FeatureCache:
    """The cache for `loaded` (a model from runner.model.load_blip2) under `root`."""
    import transformers

    identity = {"model": model, "revision": revision, "precision": precision, "dtype": str(dtype),
                "image_processor": processor.image_processor.to_dict(),
                "transformers": transformers.__version__}
    if vision_only:  # another tensor of the same images (absent otherwise: existing caches keep their key)
        identity["output"] = "vision tower"
    path = Path(model)
    if (path / "config.json").exists():  # a local directory: a rewritten weight file is another model
        identity["files"] = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()
                                   if f.name.endswith(WEIGHT_SUFFIXES))
        identity["model"] = str(path.resolve())
    else:  # a hub id: the commit actually loaded, whatever revision was asked for
        identity["commit"] = getattr(loaded.config, "_commit_hash", None)
    if precision in ("int8", "nf4"):
        import bitsandbytes

        identity["bitsandbytes"] = bitsandbytes.__version__
    return FeatureCache(root, identity)


def trial_feature_cache(config, dtype: torch.dtype, loaded, processor,
                        vision_only: bool = False) -> FeatureCache | None:
    """The node's cache for a trial's model and precision (None when the trial turns it off); `vision_only`
    for the vision tower's output (a Q-Former that trains)."""
    from runner.model.paths import cache_dir, resolve_model

    if not config.cache_image_features:
        return None
    return feature_cache(cache_dir() / "image-features", resolve_model(config.model), config.model_revision,
                         config.precision, dtype, loaded, processor, vision_only)


def compute_image_features(model, processor, images: dict[str, Image.Image], device: torch.device,
                           dtype: torch.dtype, batch_size: int = 32, cache: FeatureCache | None = None,
                           vision_only: bool = False) -> ImageFeatures:
    """Each image's features: from `cache` when it has them, else one pass through the frozen path
    (saved to `cache`). `vision_only`: stop at the vision tower (the Q-Former trains); `cache` must be
    the one for that output (trial_feature_cache picks it from the trial's lora_targets)."""
    keys = sorted(images)
    found: dict[str, torch.Tensor] = {}
    load_cached(cache, keys, found, device)
    missing = [key for key in keys if key not in found]
    with cache.computing() if cache is not None and missing else contextlib.nullcontext():
        load_cached(cache, missing, found, device)  # what a trial that held the lock computed meanwhile
        missing = [key for key in keys if key not in found]
        if cache is not None:
            log.info("image features: %d from the cache %s, %d to compute", len(found), cache.directory,
                     len(missing))
        for start in tqdm(range(0, len(missing), batch_size), desc="image features", leave=False, disable=None):
            exiting.check()
            batch = missing[start : start + batch_size]
            pixels = processor.image_processor([images[key] for key in batch], return_tensors="pt")["pixel_values"]
            values = (vision_features if vision_only else image_features)(model, pixels.to(device, dtype))
            found.update(zip(batch, values))
            if cache is not None:  # one device-to-host copy per batch, not per image
                for key, row in zip(batch, values.cpu()):
                    cache.save(key, row)
    values = torch.stack([found[key] for key in keys]) if keys else torch.empty(0)
    return ImageFeatures(index={key: i for i, key in enumerate(keys)}, values=values, vision_only=vision_only)


def load_cached(cache: FeatureCache | None, keys: list[str], found: dict[str, torch.Tensor],
                device: torch.device) -> None:
    for key in keys if cache is not None else ():
        cached = cache.load(key)
        if cached is not None:
            found[key] = cached.to(device)
