"""One trial: fine-tune BLIP-2's Flan-T5 with LoRA on a VQA task, validate and checkpoint every epoch.

`train_trial` is what each Ray Train worker runs (runner/sweep.py) and what `runner train` runs
without Ray. It builds its pieces in dependency order — seed, device, data, model, image features,
LoRA, optimizer, schedule, resume — then loops over epochs.

Supports: int8/nf4 (CUDA) and bf16/fp16/fp32 weights, gradient accumulation, gradient checkpointing,
resume from any epoch checkpoint. Refuses: n_samples larger than the train split, a NaN/inf loss.

The frozen image path (ViT, Q-Former, projection) is computed once per image before training and
reused every epoch: LoRA touches only the language model, so those outputs depend on the image alone.
They are computed in eval mode (no Q-Former dropout), unlike a loop that reruns the frozen tower in
train mode every step — a deliberate difference that makes a step several times cheaper.
"""

from __future__ import annotations

import json
import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from runner.config import TrialConfig
from runner.errors import UserError
from runner.preflight import preflight
from runner.evaluate import draw_samples, evaluate, majority_exact_match
from runner.features import ImageFeatures, compute_image_features, trial_feature_cache
from runner.model import (
    add_lora, check_precision, compute_dtype, encode_answers, encode_prompts, image_token_id, load_blip2,
    resolve_device, resolve_model, text_embeddings,
)
from tasks import get_task
from tasks.base import Example

log = logging.getLogger(__name__)

Report = Callable[[dict[str, float], Path], None]
ADAPTER_DIR = "adapter"
STATE_FILE = "trainer_state.pt"
CONFIG_FILE = "trial_config.json"
METRICS_FILE = "metrics.json"
SYNC_EVERY = 16  # batches between read-backs of the loss (see train_epoch)
DATA_FILE = "data.json"  # fingerprints of the data the adapter was trained and validated on


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial stops (it is not a user error, it is a bad setting)."""


class TrialOutOfMemory(RuntimeError):
    """The GPU ran out of memory: the trial fails, saying which settings to change."""


@dataclass
class TrialResult:
    history: list[dict[str, float]] = field(default_factory=list)
    checkpoints: list[Path] = field(default_factory=list)


def train_trial(
    config: TrialConfig, output_dir: Path, *, report: Report | None = None, resume_from: Path | None = None
) -> TrialResult:
    """Train one trial; report (metrics, checkpoint) after every epoch."""
    try:
        return run_epochs(config, output_dir, report, resume_from)
    except torch.OutOfMemoryError as error:
        raise TrialOutOfMemory(
            f"out of GPU memory (batch_size={config.batch_size}, precision={config.precision}, "
            f"lora_rank={config.lora_rank}): lower batch_size and raise grad_accum, set gradient_checkpointing, "
            f"or give each trial more of a GPU (resources.gpu) — {str(error).splitlines()[0]}") from error


def run_epochs(config: TrialConfig, output_dir: Path, report: Report | None, resume_from: Path | None) -> TrialResult:
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    check_precision(config.precision, device)  # before any data is read or memory taken
    limit_gpu_memory(config, device)
    preflight(config, resolve_model(config.model), compute_dtype(config.precision, device), device)

    task = get_task(config.task, data=config.data, skip_bad_images=config.skip_bad_images,
                    val_fraction=config.val_fraction, seed=config.seed)
    train_split, val_split = task.load_split("train"), task.load_split("validation")
    train_examples = draw_samples(train_split.examples, config.n_samples, config.seed, "n_samples")
    val_examples = draw_samples(val_split.examples, min(config.max_eval_examples or len(val_split.examples),
                                                        len(val_split.examples)), config.seed, "max_eval_examples")
    log.info("task %s: %d training / %d validation questions (train split %d, fingerprint %s)", task.name,
             len(train_examples), len(val_examples), len(train_split.examples), train_split.fingerprint[:12])

    fingerprints = {"train_fingerprint": train_split.fingerprint, "validation_fingerprint": val_split.fingerprint,
                    "train_split_questions": len(train_split.examples), "skipped_records": train_split.skipped}
    majority = majority_exact_match([task.normalize_answer(ex.answer) for ex in train_examples],
                                    [task.normalize_answer(ex.answer) for ex in val_examples])
    base, processor = load_blip2(config.model, config.precision, device, config.model_revision)
    dtype = compute_dtype(config.precision, device)
    needed = {ex.image_key for ex in train_examples + val_examples}
    images = {key: img for split in (train_split, val_split) for key, img in split.images.items() if key in needed}
    features = compute_image_features(base, processor, images, device, dtype, batch_size=config.eval_batch_size,
                                      cache=trial_feature_cache(config, dtype, base, processor))
    memory = PeakMemory(device)
    memory.mark("load_and_features")

    model = add_lora(base, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                     quantized=config.precision in ("int8", "nf4"),
                     gradient_checkpointing=config.gradient_checkpointing)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")  # one kernel for all LoRA tensors
    steps_per_epoch = math.ceil(math.ceil(len(train_examples) / config.batch_size) / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_then_linear_decay(
        round(config.warmup_ratio * total_steps), total_steps))

    start_epoch = 0
    result = TrialResult()
    if resume_from is not None:
        start_epoch, result.history = restore(resume_from, model, optimizer, scheduler, config)
        log.info("resumed from %s after epoch %d", resume_from, start_epoch)

    for epoch in range(start_epoch + 1, config.epochs + 1):
        started = time.perf_counter()
        train_loss = train_epoch(model, base, processor, task, train_examples, features, optimizer, scheduler,
                                 config, epoch, device)
        elapsed = time.perf_counter() - started
        memory.mark("train")
        scores, _ = evaluate(base, processor, task, val_examples, features,
                             batch_size=config.eval_batch_size, max_new_tokens=config.max_new_tokens)
        memory.mark("eval")
        epoch_metrics = {"epoch": float(epoch), "train_loss": train_loss,
                         "train_samples_per_second": len(train_examples) / elapsed,
                         **{f"val_{name}": value for name, value in scores.items()},
                         "val_majority_exact_match": majority, **memory.peaks}
        result.history.append(epoch_metrics)
        checkpoint = save_checkpoint(output_dir / f"epoch-{epoch:03d}", model, optimizer, scheduler, config,
                                     epoch, result.history, fingerprints)
        result.checkpoints.append(checkpoint)
        log.info("epoch %d/%d: loss %.4f, val exact match %.3f (shuffled images %.3f), BLEU-1 %.3f, F1 %.3f",
                 epoch, config.epochs, train_loss, scores["exact_match"], scores["shuffled_exact_match"],
                 scores["bleu1"], scores["token_f1"])
        if report is not None:
            report(epoch_metrics, checkpoint)
    return result


def limit_gpu_memory(config: TrialConfig, device: torch.device) -> None:
    """Ray shares a GPU between trials but does not divide its memory: each trial caps itself."""
    if config.gpu_memory_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, config.gpu_memory_gib * 2**30 / total), device)


class PeakMemory:
    """Peak GPU memory per phase (GiB), reported as `gpu_peak_gib_<phase>`; nothing on CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        if self.device.type != "cuda":
            return
        torch.cuda.synchronize(self.device)
        self.peaks[f"gpu_peak_gib_{phase}"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        torch.cuda.reset_peak_memory_stats(self.device)


def warmup_then_linear_decay(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return factor


def train_epoch(model, base, processor, task, examples: list[Example], features: ImageFeatures, optimizer,
                scheduler, config: TrialConfig, epoch: int, device: torch.device) -> float:
    """One pass in an order seeded by (seed, epoch), so a resumed run sees the same batches.

    The loss stays on the device and is read back every SYNC_EVERY batches (progress, NaN check), not
    every batch: a read-back waits for the GPU to drain, and the host could be queueing the next step.
    """
    order = list(examples)
    random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    image_token = image_token_id(processor)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    total_loss, counted = torch.zeros((), device=device), 0
    optimizer.zero_grad(set_to_none=True)
    progress = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=None)
    for index, batch in enumerate(progress):
        encoded = encode_prompts(processor, [task.prompt(ex.question) for ex in batch], device)
        labels = encode_answers(processor, [task.normalize_answer(ex.answer) for ex in batch], device)
        embeds = text_embeddings(base, encoded["input_ids"], features.lookup([ex.image_key for ex in batch]),
                                 image_token)
        loss = base.language_model(inputs_embeds=embeds, attention_mask=encoded["attention_mask"],
                                   labels=labels).loss
        # Accumulated gradients must average, not sum, over the accumulated batches.
        (loss / config.grad_accum).backward()
        total_loss += loss.detach() * len(batch)
        counted += len(batch)
        if (index + 1) % config.grad_accum == 0 or index + 1 == len(batches):
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        if (index + 1) % SYNC_EVERY == 0 or index + 1 == len(batches):
            mean = total_loss.item() / counted
            if not math.isfinite(mean):  # the trial fails before this epoch is checkpointed
                raise TrialDiverged(f"loss became {mean} at epoch {epoch} by batch {index + 1}/{len(batches)} "
                                    f"(learning_rate={config.learning_rate}); lower the learning rate")
            progress.set_postfix(loss=f"{mean:.4f}", refresh=False)
    model.eval()
    return mean


def save_checkpoint(directory: Path, model, optimizer, scheduler, config: TrialConfig, epoch: int,
                    history: list[dict[str, float]], data: dict) -> Path:
    """Adapter (PEFT safetensors) + optimizer/scheduler/RNG state + resolved config + metrics + data."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory / ADAPTER_DIR, safe_serialization=True)
    torch.save({"epoch": epoch, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state()}, directory / STATE_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(config.to_dict(), indent=2))
    (directory / METRICS_FILE).write_text(json.dumps(history, indent=2))
    (directory / DATA_FILE).write_text(json.dumps(data, indent=2))
    return directory


def restore(directory: Path, model, optimizer, scheduler, config: TrialConfig) -> tuple[int, list[dict]]:
    """Load a checkpoint written by save_checkpoint into the freshly built trial."""
    from peft import set_peft_model_state_dict

    saved = json.loads((directory / CONFIG_FILE).read_text())
    if saved != config.to_dict():
        changed = sorted(k for k in saved.keys() | config.to_dict().keys() if saved.get(k) != config.to_dict().get(k))
        raise UserError(f"{directory}: checkpoint was written with a different config ({', '.join(changed)})")
    set_peft_model_state_dict(model, load_file(directory / ADAPTER_DIR / "adapter_model.safetensors"))
    state = torch.load(directory / STATE_FILE, weights_only=True)  # no pickled code is ever loaded
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["torch_rng"])
    return state["epoch"], json.loads((directory / METRICS_FILE).read_text())
