"""The epoch checkpoint: the one owner of its layout. It writes, reads and validates a checkpoint folder.

A checkpoint folder stands on its own (as litgpt's step folders do): the LoRA adapter (PEFT
safetensors), the processor/tokenizer, the resolved trial config, the metrics so far, the data
fingerprints and the optimizer/scheduler/RNG state. `checkpoint.json` carries the format version.

    epoch-003/
      adapter/            adapter_config.json, adapter_model.safetensors
      processor/          the Blip2Processor (image processor + tokenizer)
      trial_config.json   the resolved TrialConfig
      metrics.json        one entry per epoch so far
      trainer_state.pt    optimizer, scheduler, torch RNG (tensors only: loaded with weights_only)
      checkpoint.json     format version, epoch, data fingerprints

Writes are atomic: the folder is staged beside its final name and renamed, so a crash mid-save leaves
the previous checkpoint as it was and never a half-written one under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.config import TRAINING_FIELDS, TrialConfig, build
from runner.errors import UserError

FORMAT_VERSION = 1
ADAPTER_DIR = "adapter"
PROCESSOR_DIR = "processor"
CONFIG_FILE = "trial_config.json"
METRICS_FILE = "metrics.json"
STATE_FILE = "trainer_state.pt"
INFO_FILE = "checkpoint.json"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
FILES = (CONFIG_FILE, METRICS_FILE, STATE_FILE, INFO_FILE)


@dataclass
class Checkpoint:
    """A validated checkpoint folder."""

    path: Path
    config: TrialConfig
    epoch: int
    history: list[dict[str, float]]
    data: dict[str, Any]  # train/validation fingerprints, split size, skipped records

    @property
    def adapter(self) -> Path:
        return self.path / ADAPTER_DIR

    @property
    def processor(self) -> Path:
        return self.path / PROCESSOR_DIR


def save(directory: Path, *, model, processor, optimizer, scheduler, config: TrialConfig, epoch: int,
         history: list[dict[str, float]], data: dict[str, Any]) -> Path:
    """Write the checkpoint of `epoch` into `directory` (atomically); return it."""
    import torch

    staging = directory.with_name(f".{directory.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging / ADAPTER_DIR, safe_serialization=True)
    processor.save_pretrained(staging / PROCESSOR_DIR)
    torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, staging / STATE_FILE)
    (staging / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    (staging / METRICS_FILE).write_text(json.dumps(history, indent=2))
    (staging / INFO_FILE).write_text(json.dumps({"format_version": FORMAT_VERSION, "epoch": epoch, "data": data},
                                                indent=2))
    if directory.exists():  # an epoch written again (a restarted worker): replace it whole
        shutil.rmtree(directory)
    os.replace(staging, directory)
    return directory


def load(directory: Path, *, overrides: dict[str, Any] | None = None) -> Checkpoint:
    """Read and validate a checkpoint folder; a damaged or foreign one is a clear error naming the file."""
    directory = Path(directory)
    missing = [name for name in FILES if not (directory / name).is_file()]
    missing += [f"{ADAPTER_DIR}/{name}" for name in ADAPTER_FILES if not (directory / ADAPTER_DIR / name).is_file()]
    if missing:
        raise UserError(f"checkpoint {directory}: missing {', '.join(missing)} (not a complete runner checkpoint)")
    info = read_json(directory / INFO_FILE)
    if info.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{directory / INFO_FILE}: checkpoint format {info.get('format_version')!r}; this runner "
                        f"reads format {FORMAT_VERSION}")
    saved = read_json(directory / CONFIG_FILE)
    config = build(TrialConfig, {**known_fields(saved), **(overrides or {})}, str(directory / CONFIG_FILE))
    return Checkpoint(directory, config, int(info["epoch"]), read_json(directory / METRICS_FILE), info["data"])


def read_config(directory: Path | None, overrides: dict[str, Any]) -> TrialConfig:
    """The trial config of a checkpoint, updated by `overrides` (no checkpoint, or a bare adapter folder:
    the overrides alone)."""
    if directory is not None and (Path(directory) / INFO_FILE).exists():
        return load(directory, overrides=overrides).config
    return build(TrialConfig, overrides, "command line")


def adapter_dir(source: Path) -> Path:
    """The PEFT adapter inside a checkpoint, or `source` itself when it is a bare adapter folder."""
    folder = source / ADAPTER_DIR if (source / ADAPTER_DIR).is_dir() else source
    if not (folder / "adapter_config.json").exists():
        raise UserError(f"adapter: {source} holds no PEFT adapter (adapter_config.json)")
    return folder


def adapter_weights(folder: Path) -> dict[str, Any]:
    """The adapter's tensors, read whole before anything trusts them: a truncated or damaged file is a
    clear error naming it, never a traceback from deep in PEFT (they are a few MB)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = folder / ADAPTER_FILES[1]
    try:
        return load_file(weights)
    except (SafetensorError, OSError) as error:
        raise UserError(f"{weights}: cannot read the adapter weights (damaged or incomplete?): "
                        f"{str(error).splitlines()[0]}") from error


def check_resumable(checkpoint: Checkpoint, config: TrialConfig) -> None:
    """Resume only under the same training settings; fields that do not change training may differ
    (a field added later, with a default, leaves old checkpoints resumable)."""
    saved, ours = checkpoint.config.to_dict(), config.to_dict()
    changed = [key for key in TRAINING_FIELDS if saved.get(key) != ours.get(key)]
    if changed:
        raise UserError(f"{checkpoint.path}: checkpoint was written with a different config ({', '.join(changed)})")


def restore(checkpoint: Checkpoint, model, optimizer, scheduler) -> None:
    """Load the adapter weights and the optimizer/scheduler/RNG state into a freshly built trial."""
    import torch
    from peft import set_peft_model_state_dict

    weights = adapter_weights(checkpoint.adapter)
    try:
        state = torch.load(checkpoint.path / STATE_FILE, weights_only=True)  # no pickled code is ever loaded
    except (RuntimeError, OSError, EOFError) as error:
        raise UserError(f"{checkpoint.path / STATE_FILE}: cannot read the optimizer state (damaged or "
                        f"incomplete?): {str(error).splitlines()[0]}") from error
    set_peft_model_state_dict(model, weights)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])


def known_fields(saved: dict[str, Any]) -> dict[str, Any]:
    """A saved config without keys this version no longer has (they cannot matter to it)."""
    from dataclasses import fields

    names = {f.name for f in fields(TrialConfig)}
    return {key: value for key, value in saved.items() if key in names}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"{path}: cannot read ({error})") from error
