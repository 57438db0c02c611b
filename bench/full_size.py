"""The full-size `Salesforce/blip2-flan-t5-xl` architecture with random weights, saved to disk.

No hub is reachable on our machines, so the real weights cannot be downloaded; the compute and the
memory of a step depend only on the architecture, which is written out here from the checkpoint's
published config. The processor reuses the tiny model's offline tokenizer (its ids are valid for the
32k-word T5 vocabulary) with a 224-pixel BLIP image processor. Saved with `save_pretrained`, it then
loads through the same `runner.model.load_blip2` as the real checkpoint.

    python bench/full_size.py OUT_DIR        # ~8 GB on disk (bf16); needs a GPU for a quick init
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from transformers import (
    Blip2Config,
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Blip2QFormerConfig,
    Blip2VisionConfig,
    BlipImageProcessor,
    T5Config,
)

from runner.model.paths import resolve_model

NUM_QUERY_TOKENS = 32


def full_size_config(image_token_index: int) -> Blip2Config:
    vision = Blip2VisionConfig(hidden_size=1408, intermediate_size=6144, num_hidden_layers=39,
                               num_attention_heads=16, image_size=224, patch_size=14, qkv_bias=True,
                               layer_norm_eps=1e-6)
    qformer = Blip2QFormerConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072, cross_attention_frequency=2, encoder_hidden_size=1408)
    text = T5Config(d_model=2048, d_ff=5120, d_kv=64, num_heads=32, num_layers=24, num_decoder_layers=24,
                    vocab_size=32128, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                    decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(),
                       text_config=text.to_dict(), num_query_tokens=NUM_QUERY_TOKENS,
                       image_token_index=image_token_index)


def build(out: Path) -> Path:
    started = time.perf_counter()
    tiny = Blip2Processor.from_pretrained(resolve_model("tiny"))
    image_processor = BlipImageProcessor(size={"height": 224, "width": 224})
    processor = Blip2Processor(image_processor, tiny.tokenizer, num_query_tokens=NUM_QUERY_TOKENS)
    token = processor.image_token
    config = full_size_config(processor.tokenizer.convert_tokens_to_ids(getattr(token, "content", token)))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Blip2ForConditionalGeneration(config).to(torch.bfloat16)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    params = sum(p.numel() for p in model.parameters())
    print(f"full-size BLIP-2 (random weights): {params / 1e9:.2f} B parameters -> {out} "
          f"in {time.perf_counter() - started:.0f} s")
    return out


if __name__ == "__main__":
    build(Path(sys.argv[1]))
