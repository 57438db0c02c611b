"""One trial: fine-tune BLIP-2's Flan-T5 with LoRA on a VQA task, validate and checkpoint every epoch.

`train_trial` is what each Ray Train worker runs (runner/sweep/trial.py) and what `runner train` runs
without Ray. It reads top to bottom like torchtune's single-device LoRA recipe: setup phases in
dependency order (device and precision, data, model, image features, LoRA, optimizer and schedule,
resume), then the epochs (train, validate, checkpoint, report).

The frozen image path (ViT, Q-Former, projection) is computed once per image before training and
reused every epoch: LoRA on the language model leaves those outputs depending on the image alone.
They are computed in eval mode (no Q-Former dropout), unlike a loop that reruns the frozen tower in
train mode every step — a deliberate difference that makes a step several times cheaper. When LoRA
adapts the Q-Former too (`lora_targets`), only the vision tower's output is precomputed and the
Q-Former and projection run in every step (train mode, with its dropout).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from runner import exiting
from runner.config import TrialConfig
from runner.eval.evaluate import draw_samples, evaluate, majority_exact_match
from runner.model.blip2 import (
    add_lora,
    check_precision,
    compute_dtype,
    encode_answers,
    encode_prompts,
    image_token_id,
    load_blip2,
    resolve_device,
    text_embeddings,
)
from runner.model.features import (
    ImageFeatures,
    compute_image_features,
    trial_feature_cache,
)
from runner.model.paths import resolve_model
from runner.model.preflight import preflight
from runner.train import checkpoint
from tasks import get_task
from tasks.base import Example, Task

log = logging.getLogger(__name__)

Report = Callable[[dict[str, float], Path], None]
SYNC_EVERY = 16  # batches between read-backs of the loss (see train_epoch)


class TrialDiverged(RuntimeError):
    """The loss became NaN or infinite: the trial stops (it is not a user error, it is a bad setting)."""


class TrialOutOfMemory(RuntimeError):
    """The GPU ran out of memory: the trial fails, saying which settings to change."""


@dataclass
class TrainState:
    """What an epoch of training touches. `lora_model` wraps `base` (PEFT injects LoRA in place)."""

    config: TrialConfig
    device: torch.device
    task: Task
    base: Any  # Blip2ForConditionalGeneration
    processor: Any  # Blip2Processor
    features: ImageFeatures
    lora_model: Any  # peft.PeftModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler


def train_trial(config: TrialConfig, output_dir: Path, *, report: Report | None = None,
                resume_from: Path | None = None, gpu_share: float = 1.0,
                started_at: float | None = None) -> list[dict[str, float]]:
    """Train one trial; report (metrics, checkpoint) after every epoch; return every epoch's metrics.
    `gpu_share`: the fraction of the GPU this trial was given (its memory plan counts only that);
    `started_at`: when the trial started (time.time(); default now), for its `start_seconds`."""
    try:
        return run(config, output_dir, report, resume_from, gpu_share, Phases(started_at))
    except torch.OutOfMemoryError as error:
        raise TrialOutOfMemory(
            f"out of GPU memory (batch_size={config.batch_size}, precision={config.precision}, "
            f"lora_rank={config.lora_rank}): lower batch_size and raise grad_accum, set gradient_checkpointing, "
            f"or give each trial more of a GPU (resources.gpu) — {str(error).splitlines()[0]}") from error


def run(config: TrialConfig, output_dir: Path, report: Report | None, resume_from: Path | None,
        gpu_share: float, phases: Phases) -> list[dict]:
    # 1. Seed, device and precision: refuse what cannot work before reading data or taking memory.
    torch.manual_seed(config.seed)
    device = resolve_device(config.device)
    check_precision(config.precision, device)
    dtype = compute_dtype(config.precision, device)
    limit_gpu_memory(config, device)
    preflight(config, resolve_model(config.model), dtype, device, gpu_share)
    phases.mark("start")

    # 2. Data: the seeded training draw, the fixed validation subset, the majority-answer floor.
    task = get_task(config.task, data=config.data, skip_bad_images=config.skip_bad_images,
                    val_fraction=config.val_fraction, seed=config.seed)
    train_split, val_split = task.load_split("train"), task.load_split("validation")
    train_examples = draw_samples(train_split.examples, config.n_samples, config.seed, "n_samples")
    val_size = min(config.max_eval_examples or len(val_split.examples), len(val_split.examples))
    val_examples = draw_samples(val_split.examples, val_size, config.seed, "max_eval_examples")
    data = {"train_fingerprint": train_split.fingerprint, "validation_fingerprint": val_split.fingerprint,
            "train_split_questions": len(train_split.examples), "skipped_records": train_split.skipped}
    majority = majority_exact_match([task.normalize_answer(ex.answer) for ex in train_examples],
                                    [task.normalize_answer(ex.answer) for ex in val_examples])
    log.info("task %s: %d training / %d validation questions (train split %d, fingerprint %s); LoRA rank %d, "
             "learning rate %g", task.name, len(train_examples), len(val_examples), len(train_split.examples),
             train_split.fingerprint[:12], config.lora_rank, config.learning_rate)

    phases.mark("data")

    # 3. Model, then 4. the frozen image path's features (once per image, from the node's cache if there).
    base, processor = load_blip2(config.model, config.precision, device, config.model_revision)
    phases.mark("model")
    needed = {ex.image_key for ex in train_examples + val_examples}
    images = (train_split.images | val_split.images).select(needed)  # decoded one batch at a time, if not cached
    features = compute_image_features(base, processor, images, device, dtype, batch_size=config.eval_batch_size,
                                      cache=trial_feature_cache(config, dtype, base, processor, config.trains_qformer),
                                      vision_only=config.trains_qformer)
    memory = PeakMemory(device)
    memory.mark("load_and_features")
    phases.mark("image features")

    # 5. LoRA, 6. optimizer and schedule (linear warmup, then linear decay to 0).
    from transformers import get_linear_schedule_with_warmup

    lora_model = add_lora(base, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout,
                          gradient_checkpointing=config.gradient_checkpointing, targets=config.target_modules)
    optimizer = torch.optim.AdamW([p for p in lora_model.parameters() if p.requires_grad], lr=config.learning_rate,
                                  weight_decay=config.weight_decay,
                                  fused=device.type == "cuda")  # one kernel for all LoRA tensors
    steps_per_epoch = math.ceil(math.ceil(len(train_examples) / config.batch_size) / config.grad_accum)
    total_steps = steps_per_epoch * config.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, round(config.warmup_ratio * total_steps), total_steps)
    state = TrainState(config, device, task, base, processor, features, lora_model, optimizer, scheduler)

    # 7. Resume: the same training settings only; then the epochs continue where the checkpoint ended.
    history: list[dict[str, float]] = []
    if resume_from is not None:
        saved = checkpoint.load(resume_from)
        checkpoint.check_resumable(saved, config)
        checkpoint.restore(saved, lora_model, optimizer, scheduler)
        history = saved.history
        log.info("resumed from %s after epoch %d", resume_from, saved.epoch)
    phases.mark("LoRA and optimizer")
    log.info("first step %.1f s after the trial started (%s)", phases.total, phases)

    for epoch in range(len(history) + 1, config.epochs + 1):
        started = time.perf_counter()
        train_loss = train_epoch(state, train_examples, epoch)
        elapsed = time.perf_counter() - started
        memory.mark("train")
        scores, _ = evaluate(base, processor, task, val_examples, features,
                             batch_size=config.eval_batch_size, max_new_tokens=config.max_new_tokens)
        memory.mark("eval")
        history.append({"epoch": float(epoch), "train_loss": train_loss,
                        "train_samples_per_second": len(train_examples) / elapsed,
                        **{f"val_{name}": value for name, value in scores.items()},
                        "val_majority_exact_match": majority, "start_seconds": phases.total, **memory.peaks})
        saved_to = checkpoint.save(output_dir / f"epoch-{epoch:03d}", model=lora_model, processor=processor,
                                   optimizer=optimizer, scheduler=scheduler, config=config, epoch=epoch,
                                   history=history, data=data)
        log.info("epoch %d/%d: loss %.4f, val exact match %.3f (shuffled images %.3f), BLEU-1 %.3f, F1 %.3f",
                 epoch, config.epochs, train_loss, scores["exact_match"], scores["shuffled_exact_match"],
                 scores["bleu1"], scores["token_f1"])
        if report is not None:
            report(history[-1], saved_to)
    return history


def train_epoch(state: TrainState, examples: list[Example], epoch: int) -> float:
    """One pass in an order seeded by (seed, epoch), so a resumed run sees the same batches; the mean loss.

    The loss stays on the device and is read back every SYNC_EVERY batches (progress, NaN check), not
    every batch: a read-back waits for the GPU to drain, and the host could be queueing the next step.
    """
    config, processor, task = state.config, state.processor, state.task
    order = list(examples)
    random.Random(config.seed * 1_000_003 + epoch).shuffle(order)
    batches = [order[i : i + config.batch_size] for i in range(0, len(order), config.batch_size)]
    image_token = image_token_id(processor)
    trainable = [p for p in state.lora_model.parameters() if p.requires_grad]
    state.lora_model.train()
    total_loss, counted = torch.zeros((), device=state.device), 0
    state.optimizer.zero_grad(set_to_none=True)
    progress = tqdm(batches, desc=f"epoch {epoch}", leave=False, disable=None)
    for index, batch in enumerate(progress):
        exiting.check()
        encoded = encode_prompts(processor, [task.prompt(ex.question) for ex in batch], state.device)
        labels = encode_answers(processor, [task.normalize_answer(ex.answer) for ex in batch], state.device)
        embeds = text_embeddings(state.base, encoded["input_ids"],
                                 state.features.language_inputs(state.base, [ex.image_key for ex in batch]),
                                 image_token)
        loss = state.base.language_model(inputs_embeds=embeds, attention_mask=encoded["attention_mask"],
                                         labels=labels).loss
        # Accumulated gradients must average, not sum, over the accumulated batches.
        (loss / config.grad_accum).backward()
        total_loss += loss.detach() * len(batch)
        counted += len(batch)
        if (index + 1) % config.grad_accum == 0 or index + 1 == len(batches):
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
            state.optimizer.step()
            state.scheduler.step()
            state.optimizer.zero_grad(set_to_none=True)
        if (index + 1) % SYNC_EVERY == 0 or index + 1 == len(batches):
            mean = total_loss.item() / counted
            if not math.isfinite(mean):  # the trial fails before this epoch is checkpointed
                raise TrialDiverged(f"loss became {mean} at epoch {epoch} by batch {index + 1}/{len(batches)} "
                                    f"(learning_rate={config.learning_rate}); lower the learning rate")
            progress.set_postfix(loss=f"{mean:.4f}", refresh=False)
    state.lora_model.eval()
    return mean


def limit_gpu_memory(config: TrialConfig, device: torch.device) -> None:
    """Ray shares a GPU between trials but does not divide its memory: each trial caps itself."""
    if config.gpu_memory_gib and device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, config.gpu_memory_gib * 2**30 / total), device)


class Phases:
    """Seconds spent in each setup phase since `started_at` (the trial's start; default now): how long a
    trial takes to reach its first step, and where that time goes (`start`: before the loop began —
    Ray's processes and the imports — plus the device checks)."""

    def __init__(self, started_at: float | None = None):
        self.began = time.time() if started_at is None else started_at
        self.last = self.began
        self.seconds: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        now = time.time()
        self.seconds[phase], self.last = now - self.last, now

    @property
    def total(self) -> float:
        return self.last - self.began

    def __str__(self) -> str:
        return ", ".join(f"{phase} {seconds:.1f} s" for phase, seconds in self.seconds.items())


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
