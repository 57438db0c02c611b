"""Loading BLIP-2 (Flan-T5) at one precision, adding LoRA, and the frozen image path.

The real `Salesforce/blip2-flan-t5-xl` and the offline tiny model (`tiny`, see runner/tiny/) go
through the same `from_pretrained` code; only the name resolves differently.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import Blip2ForConditionalGeneration, Blip2Processor

from runner.config import Precision
from runner.config.schema import QFORMER_TARGETS
from runner.errors import UserError
from runner.model.paths import cache_dir, resolve_model

log = logging.getLogger(__name__)

T5_FEED_FORWARD_IN = ("wi", "wi_0", "wi_1")  # `wi`: one projection, or two in gated Flan-T5 (wi_0, wi_1)


def resolve_device(requested: str) -> torch.device:
    """`auto` → CUDA when visible; a CUDA device always carries its index (memory APIs need it)."""
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UserError("device: 'cuda' requested but no CUDA device is visible")
    return torch.device("cuda", torch.cuda.current_device())


def compute_dtype(precision: Precision, device: torch.device) -> torch.dtype:
    """The dtype of the non-quantised weights and of the activations.

    int8/nf4: bf16 where the card has it; otherwise fp32, because Flan-T5 overflows to NaN under fp16
    activations and a T4 (sm_75) has no native bf16 — the int8 matmuls still run in int8.
    """
    if precision in ("int8", "nf4"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def check_precision(precision: Precision, device: torch.device) -> None:
    """Refuse combinations that cannot work before anything is loaded."""
    if precision in ("int8", "nf4") and device.type != "cuda":
        raise UserError(
            f"precision: {precision} needs a CUDA GPU (bitsandbytes); on {device.type} use fp32 or bf16"
        )
    if precision == "fp16" and device.type != "cuda":
        raise UserError("precision: fp16 needs a CUDA GPU; on CPU use fp32 or bf16")
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"precision: bf16 is not supported natively by {torch.cuda.get_device_name(device)}; "
            "use int8 (default) or fp32"
        )


def load_blip2(
    name: str, precision: Precision, device: torch.device, revision: str | None = None
) -> tuple[Blip2ForConditionalGeneration, Blip2Processor]:
    """Load model + processor by hub id or local directory at `precision` on `device`."""
    check_precision(precision, device)
    path = resolve_model(name)
    if Path(path).is_absolute() or path.startswith("."):
        if not (Path(path) / "config.json").exists():
            raise UserError(f"model: {path} is not a saved BLIP-2 directory (no config.json)")
    dtype = compute_dtype(precision, device)
    kwargs: dict = {"dtype": dtype, "revision": revision}
    if precision in ("int8", "nf4"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_8bit=True)
            if precision == "int8"
            else BitsAndBytesConfig(
                load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
            )
        )
        kwargs["device_map"] = {"": device.index or 0}
        logging.getLogger("bitsandbytes.autograd._functions").addFilter(INT8_CAST_NOTICE)
    try:
        if "quantization_config" in kwargs:
            model = load_quantized(path, revision, precision, dtype, kwargs)
        else:
            model = Blip2ForConditionalGeneration.from_pretrained(path, **kwargs)
        processor = Blip2Processor.from_pretrained(path, revision=revision)
    except OSError as error:
        raise UserError(f"model: cannot load {name!r}: {error}") from error
    if precision not in ("int8", "nf4"):
        model.to(device)
    model.eval()
    check_image_tokens(model, processor, name)
    return model, processor


def load_quantized(path: str, revision: str | None, precision: Precision, dtype: torch.dtype, kwargs: dict):
    """An int8/nf4 model: from this node's cache of quantised weights (runner/model/quantized.py) when it
    has them, else loaded and quantised from `path`, then cached for the next trial."""
    from runner.model.quantized import quantized_cache

    cache = quantized_cache(cache_dir() / "quantized", path, revision, precision, dtype)
    if cache is None:
        return Blip2ForConditionalGeneration.from_pretrained(path, **kwargs)
    with cache.lock():
        entry = cache.lookup()
        if entry is not None:
            try:  # its config.json carries the quantisation config
                return Blip2ForConditionalGeneration.from_pretrained(entry, dtype=dtype,
                                                                     device_map=kwargs["device_map"])
            except (OSError, ValueError, RuntimeError) as error:
                log.warning("quantised-weight cache: %s does not load (%s); loading the model from its source",
                            entry, str(error).splitlines()[0])
                cache.remove()
        model = Blip2ForConditionalGeneration.from_pretrained(path, **kwargs)
        cache.store(model)
        return model


def check_image_tokens(model: Blip2ForConditionalGeneration, processor: Blip2Processor, name: str) -> None:
    """The processor must insert exactly the image tokens the model scatters its features into."""
    expected = model.config.num_query_tokens
    if processor.num_query_tokens != expected:
        raise UserError(
            f"model: {name}: processor inserts {processor.num_query_tokens} image tokens but the model "
            f"has {expected} query tokens (save the processor with num_query_tokens={expected})"
        )
    token_id = image_token_id(processor)
    if token_id != model.config.image_token_index:
        raise UserError(
            f"model: {name}: the processor's image token has id {token_id} but the model expects "
            f"image_token_index={model.config.image_token_index}"
        )


def image_token_id(processor: Blip2Processor) -> int:
    token = processor.image_token
    return processor.tokenizer.convert_tokens_to_ids(getattr(token, "content", token))


def lora_target_pattern(targets: tuple[str, ...] | list[str]) -> str:
    """PEFT's `target_modules` as a regex over module paths: T5 names only inside the language model and
    Q-Former names only inside the Q-Former, so a short name like `q` or `value` never lands elsewhere."""
    t5 = [name for name in targets if name not in QFORMER_TARGETS]
    t5 = [alias for name in t5 for alias in (T5_FEED_FORWARD_IN if name == "wi" else (name,))]
    qformer = [name for name in targets if name in QFORMER_TARGETS]
    parts = ([rf"language_model\..*\.(?:{'|'.join(t5)})"] if t5 else []) + \
        ([rf"qformer\..*\.(?:{'|'.join(qformer)})"] if qformer else [])
    return "|".join(parts)


def add_lora(
    model: Blip2ForConditionalGeneration,
    *,
    rank: int,
    alpha: float,
    dropout: float,
    gradient_checkpointing: bool,
    targets: tuple[str, ...] = ("q", "v"),
):
    """Freeze everything, then add trainable LoRA adapters to `targets` (TrialConfig.lora_targets).

    int8/nf4 models keep their dense weights in the compute dtype (bf16 on a card that has it): PEFT's
    `prepare_model_for_kbit_training` is not used, because it upcasts every non-quantised weight to fp32,
    which makes the whole loop run fp32 activations (a cast per int8 matmul, twice the bytes). The
    weights Flan-T5 needs in fp32 (`wo`, transformers' `_keep_in_fp32_modules`) stay fp32 as loaded, and
    the LoRA weights are fp32 (PEFT's default), so training is as stable as in bf16.
    """
    from peft import LoraConfig, get_peft_model

    for parameter in model.parameters():
        parameter.requires_grad = False
    if gradient_checkpointing:
        # Non-reentrant: the inputs (cached image features + embeddings) need no grad.
        model.language_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(
        r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=lora_target_pattern(targets), bias="none"
    )
    peft_model = get_peft_model(model, lora)
    trained = ("language_model", "qformer") if any(name in QFORMER_TARGETS for name in targets) else ("language_model",)
    outside = [n for n, p in peft_model.named_parameters()
               if p.requires_grad and not any(f".{part}." in f".{n}" for part in trained)]
    if outside:  # the image-feature cache is only valid for what stays frozen
        raise RuntimeError(f"LoRA reached beyond {' and '.join(trained)}: {outside[:3]}")
    return peft_model


class DropInt8CastNotice(logging.Filter):
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from torch.bfloat16 to float16" on every int8
    matmul (97,455 lines in one GPU sweep): LLM.int8 quantises its inputs from fp16 by design, so for bf16
    or fp32 activations the notice says nothing new. Only that message is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast from")


INT8_CAST_NOTICE = DropInt8CastNotice()  # one instance: adding it again is a no-op


def adapter_trains_qformer(adapter: Path) -> bool:
    """Whether a saved PEFT adapter folder adapts the Q-Former (its image features then stop at the vision
    tower, whatever the config scoring it says)."""
    import json

    targets = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("target_modules") or []
    return "qformer" in (targets if isinstance(targets, str) else " ".join(targets))


@torch.no_grad()
def image_features(model: Blip2ForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """The frozen image path: ViT → Q-Former(query tokens) → projection, [batch, queries, d_model].

    Written out with the sub-modules (not `get_image_features`) because its return type changed
    between transformers 5.17 (our GPU host) and 5.24.
    """
    return query_features(model, vision_features(model, pixel_values))


@torch.no_grad()
def vision_features(model: Blip2ForConditionalGeneration, pixel_values: torch.Tensor) -> torch.Tensor:
    """The vision tower's output, [batch, patches + 1, vision hidden]: frozen whatever LoRA adapts."""
    return model.vision_model(pixel_values=pixel_values, return_dict=True).last_hidden_state


def query_features(model: Blip2ForConditionalGeneration, vision: torch.Tensor) -> torch.Tensor:
    """Q-Former(query tokens, vision) → projection, [batch, queries, d_model]; with grad when the caller
    trains the Q-Former's LoRA."""
    attention = torch.ones(vision.shape[:-1], dtype=torch.long, device=vision.device)
    queries = model.query_tokens.expand(vision.shape[0], -1, -1)
    query_output = model.qformer(
        query_embeds=queries, encoder_hidden_states=vision, encoder_attention_mask=attention, return_dict=True
    ).last_hidden_state
    # The Q-Former is kept in fp32; cast back to the vision dtype as transformers does.
    return model.language_projection(query_output.to(vision.dtype))


def encode_prompts(processor: Blip2Processor, prompts: list[str], device: torch.device) -> dict[str, torch.Tensor]:
    """Tokenise a batch of prompts (one call) with the image tokens in front, as the processor lays them out."""
    batch = processor.tokenizer(prompts, padding=True, return_tensors="pt")
    n = processor.num_query_tokens
    image_ids = torch.full((len(prompts), n), image_token_id(processor), dtype=torch.long)
    return {
        "input_ids": torch.cat([image_ids, batch["input_ids"]], dim=1).to(device),
        "attention_mask": torch.cat([torch.ones_like(image_ids), batch["attention_mask"]], dim=1).to(device),
    }


def encode_answers(processor: Blip2Processor, answers: list[str], device: torch.device) -> torch.Tensor:
    """T5 decoder targets: the answer tokens (+ eos), padding masked with -100 so it is not learned."""
    labels = processor.tokenizer(answers, padding=True, return_tensors="pt")["input_ids"]
    labels[labels == processor.tokenizer.pad_token_id] = -100
    return labels.to(device)


def text_embeddings(
    model: Blip2ForConditionalGeneration, input_ids: torch.Tensor, features: torch.Tensor, image_token: int
) -> torch.Tensor:
    """Embed the prompt and put each question's image features at its image-token positions."""
    embeddings = model.language_model.get_input_embeddings()(input_ids)
    mask = (input_ids == image_token).unsqueeze(-1).expand_as(embeddings)
    return embeddings.masked_scatter(mask, features.to(embeddings.dtype))
