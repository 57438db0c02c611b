"""A node's cache of the already-quantised base model (int8 / nf4), so a trial loads it in seconds.

Loading `Salesforce/blip2-flan-t5-xl` and quantising its 3.9 B parameters with bitsandbytes took ~40 s
per trial on an H200 (2026-12-01). The quantised model, as `save_pretrained` writes it (bitsandbytes
serialises int8 and nf4 weights with their scales), loads without quantising again. The first trial
on a node loads from the source and writes the entry; trials starting at the same time wait for it
(an flock) instead of quantising the same weights in parallel.

An entry is keyed by what changes the weights: the model (a local directory + its weight files' size
and mtime, or a hub id + the commit in the local HF cache), precision, compute dtype, and the torch /
transformers / bitsandbytes versions. It is written to a temporary folder and renamed, and checked on
read against its manifest (every file's size and its safetensors header): a truncated or foreign
entry is removed and the model loaded from its source, with a warning. (Bytes past the header are
not hashed: that would cost seconds per load for ~5 GB.)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import struct
from pathlib import Path

import torch

from runner.model.node_lock import node_lock

log = logging.getLogger(__name__)

MANIFEST = "runner-manifest.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def source_identity(path: str, revision: str | None) -> dict | None:
    """What the source weights are, known before loading them; None when unknown (a hub id that is not
    in the local HF cache yet: its first load downloads it, and the next trial finds the commit)."""
    local = Path(path)
    if (local / "config.json").exists():
        return {"model": str(local.resolve()),
                "files": sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in local.iterdir()
                                if f.name.endswith(WEIGHT_SUFFIXES))}
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(path, "config.json", revision=revision)
    if not isinstance(config, str):
        return None
    return {"model": path, "commit": Path(config).parent.name}  # .../snapshots/<commit>/config.json


class QuantizedCache:
    """One entry (a `save_pretrained` folder + manifest) per quantised model under `root/<digest>/`."""

    def __init__(self, root: Path, identity: dict):
        self.identity = identity
        self.directory = root / hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:20]

    def lock(self):
        """Held from looking up to storing: one trial of a node quantises, the others wait and read."""
        return node_lock(self.directory.with_name(self.directory.name + ".lock"),
                         f"quantised weights: waiting for another trial writing {self.directory}")

    def lookup(self) -> Path | None:
        """The entry's folder when it is complete and matches its manifest; a damaged one is removed."""
        manifest = self.directory / MANIFEST
        if not manifest.exists():
            return None
        try:
            expected = json.loads(manifest.read_text())["files"]
            problem = next((f"{name}: {why}" for name, record in expected.items()
                            if (why := check_file(self.directory / name, record))), None)
        except (OSError, ValueError, KeyError) as error:
            problem = f"{manifest}: {error}"
        if problem is None:
            return self.directory
        log.warning("quantised-weight cache: %s is damaged (%s); loading the model from its source", self.directory,
                    problem)
        self.remove()
        return None

    def store(self, model) -> None:
        """Save `model` (quantised, before LoRA) as this entry: in a temporary folder, then renamed."""
        temporary = self.directory.with_name(f".{self.directory.name}.{os.getpid()}.tmp")
        shutil.rmtree(temporary, ignore_errors=True)
        model.save_pretrained(temporary)
        files = {path.name: file_record(path) for path in sorted(temporary.iterdir()) if path.is_file()}
        (temporary / MANIFEST).write_text(json.dumps({"identity": self.identity, "files": files}, indent=2))
        self.remove()
        os.replace(temporary, self.directory)
        size = sum(record["size"] for record in files.values()) / 2**30
        log.info("quantised weights saved to %s (%.1f GiB on disk)", self.directory, size)

    def remove(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def file_record(path: Path) -> dict:
    record = {"size": path.stat().st_size}
    if path.suffix == ".safetensors":
        record["header_sha256"] = hashlib.sha256(safetensors_header(path)).hexdigest()
    return record


def check_file(path: Path, record: dict) -> str | None:
    """Why `path` does not match its manifest record, or None."""
    if not path.is_file():
        return "missing"
    if path.stat().st_size != record["size"]:
        return f"{path.stat().st_size} bytes, expected {record['size']}"
    if "header_sha256" in record and hashlib.sha256(safetensors_header(path)).hexdigest() != record["header_sha256"]:
        return "safetensors header differs"
    return None


def safetensors_header(path: Path) -> bytes:
    """A safetensors file's JSON header (8-byte little-endian length, then the header): names, dtypes,
    shapes and offsets of every tensor."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > path.stat().st_size:
            raise ValueError(f"{path.name}: header length {length} exceeds the file")
        return handle.read(length)


def quantized_cache(root: Path, path: str, revision: str | None, precision: str,
                    dtype: torch.dtype) -> QuantizedCache | None:
    """The cache entry for loading `path` at `precision`, or None when its source is not known yet."""
    import bitsandbytes
    import transformers

    source = source_identity(path, revision)
    if source is None:
        return None
    identity = {**source, "precision": precision, "dtype": str(dtype), "torch": torch.__version__,
                "transformers": transformers.__version__, "bitsandbytes": bitsandbytes.__version__}
    return QuantizedCache(root, identity)
