"""Preflight: will this trial fit on this GPU? Answered before any weight is loaded.

The estimate counts the model's weights exactly from its config (built on the meta device: no memory,
no download beyond config.json) at the bytes each precision stores, plus the language model's
training activations per question, calibrated on an H100-class card with the full-size
blip2-flan-t5-xl (see docs/PERFORMANCE.md). It is an estimate: it refuses only what clearly will not
fit, with a margin, and says what to change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from runner.config import TrialConfig
from runner.errors import UserError

log = logging.getLogger(__name__)

GIB = 2**30
# Training memory of one question in the language model beyond the resident weights, in bytes per
# (d_model x layers): 0.43 GiB per question for Flan-T5-XL (2048 x 48) int8, with bf16 and with fp32
# dense weights alike (then computed in fp32: PEFT's prepare_model_for_kbit_training upcast them; the loop now
# keeps bf16 activations, so this over- rather than under-estimates): docs/PERFORMANCE.md.
ACTIVATION_BYTES_PER_UNIT = 4_700
CHECKPOINTING_SAVES = 0.3  # measured: 0.12 vs 0.43 GiB per question with gradient checkpointing
# Greedy generation keeps no activations for backward: measured on an H200 (bench/decode_speed.py, int8,
# 2026-12-03), batch 256 took 2.7 GiB more than batch 32, ~0.012 GiB per question, 1/36 of a training
# question; planned as 1/32.
GENERATED_PER_TRAINED = 32
CUDA_CONTEXT_GIB = 0.5  # the CUDA context and allocator slack, never available to tensors
MARGIN = 0.9  # plan to use at most 90% of what the card offers


@dataclass
class Estimate:
    weights_gib: float
    activations_gib: float
    total_gib: float
    available_gib: float

    @property
    def fits(self) -> bool:
        return self.total_gib <= self.available_gib * MARGIN


def weight_bytes(model_name: str, precision: str, compute_dtype: torch.dtype, revision: str | None) -> int:
    """Bytes of the weights as loaded at `precision` (bitsandbytes quantises Linear layers only)."""
    from transformers import AutoConfig, Blip2ForConditionalGeneration

    config = AutoConfig.from_pretrained(model_name, revision=revision)
    with torch.device("meta"):
        model = Blip2ForConditionalGeneration(config)
    dense = torch.finfo(compute_dtype).bits // 8
    quantised = {"int8": 1.0, "nf4": 0.5}.get(precision)
    total = 0.0
    for name, module in model.named_modules():
        for _, parameter in module.named_parameters(recurse=False):
            if name.startswith("qformer") or name == "":  # kept in fp32 by transformers (query_tokens too)
                total += parameter.numel() * 4
            elif quantised and isinstance(module, torch.nn.Linear) and not name.endswith("lm_head"):
                total += parameter.numel() * quantised
            else:
                total += parameter.numel() * dense
    return int(total)


def estimate(config: TrialConfig, model_path: str, compute_dtype: torch.dtype, device: torch.device,
             gpu_share: float = 1.0) -> Estimate:
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(model_path, revision=config.model_revision).text_config
    layers = text.num_layers + text.num_decoder_layers
    per_question = ACTIVATION_BYTES_PER_UNIT * text.d_model * layers
    if config.gradient_checkpointing:
        per_question *= CHECKPOINTING_SAVES
    weights = weight_bytes(model_path, config.precision, compute_dtype, config.model_revision)
    activations = per_question * max(config.batch_size, config.eval_batch_size / GENERATED_PER_TRAINED)
    free, total = torch.cuda.mem_get_info(device)
    available = available_gib(free, total, gpu_share, config.gpu_memory_gib)
    return Estimate(weights / GIB, activations / GIB, (weights + activations) / GIB, available)


def available_gib(free: int, total: int, gpu_share: float, gpu_memory_gib: float | None) -> float:
    """What one trial may plan to use: the card's free memory, at most its own share of the card when
    trials share it (`resources.gpu` < 1: the neighbours need theirs too), or `trial.gpu_memory_gib`
    when set (the cap the trial enforces on itself)."""
    cap = gpu_memory_gib * GIB if gpu_memory_gib else gpu_share * total
    return min(free, cap) / GIB - CUDA_CONTEXT_GIB


def preflight(config: TrialConfig, model_path: str, compute_dtype: torch.dtype, device: torch.device,
              gpu_share: float = 1.0) -> None:
    """Refuse, with what to change, a trial that will not fit in its share of `device` (`gpu_share`:
    the fraction of the card Ray gave it); log the estimate otherwise."""
    if device.type != "cuda":
        return
    result = estimate(config, model_path, compute_dtype, device, gpu_share)
    name = torch.cuda.get_device_name(device)
    if gpu_share < 1 and not config.gpu_memory_gib:
        name = f"this trial's {gpu_share:g} share of {name}"
    summary = (f"estimated peak {result.total_gib:.1f} GiB (weights {result.weights_gib:.1f}, training "
               f"activations at batch {config.batch_size} {result.activations_gib:.1f}) of "
               f"{result.available_gib:.1f} GiB available on {name}")
    if not result.fits:
        raise UserError(
            f"batch_size: trial will not fit: {summary}. Try a smaller batch_size with more grad_accum, "
            f"gradient_checkpointing: true, precision nf4" + (", or a larger resources.gpu share (fewer trials "
            "per card)" if gpu_share < 1 else ""))
    log.info("preflight: %s", summary)
