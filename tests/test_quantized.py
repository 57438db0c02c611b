"""The node's cache of quantised weights (runner/model/quantized.py) with the real bitsandbytes int8 on
the tiny model: bitsandbytes runs int8 on the CPU too, so no GPU is mocked. The first load quantises and
writes the entry, the next loads it and computes the same, a damaged entry is refused and rewritten, and
trials starting together quantise once."""

import logging
import os
import shutil
import threading

import pytest
import torch

from runner.model import blip2
from runner.model.quantized import MANIFEST, QuantizedCache, quantized_cache

pytest.importorskip("bitsandbytes")


def load(tiny_model):
    from transformers import BitsAndBytesConfig

    kwargs = {"dtype": torch.bfloat16, "revision": None, "device_map": {"": "cpu"},
              "quantization_config": BitsAndBytesConfig(load_in_8bit=True)}
    return blip2.load_quantized(str(tiny_model), None, "int8", torch.bfloat16, kwargs)


def first_query(model) -> torch.nn.Module:
    return model.language_model.encoder.block[0].layer[0].SelfAttention.q


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    monkeypatch.setenv("RUNNER_CACHE", str(tmp_path))
    return tmp_path / "quantized"


def count_stores(monkeypatch) -> list:
    stores = []
    real_store = QuantizedCache.store
    monkeypatch.setattr(QuantizedCache, "store", lambda self, model: stores.append(1) or real_store(self, model))
    return stores


def test_the_second_load_reads_the_quantised_entry_and_computes_the_same(tiny_model, cache_root, caplog,
                                                                          monkeypatch):
    caplog.set_level(logging.INFO, logger="runner.model.quantized")
    source = load(tiny_model)
    cache = quantized_cache(cache_root, str(tiny_model), None, "int8", torch.bfloat16)
    assert (cache.directory / MANIFEST).exists() and "saved to" in caplog.text
    assert type(first_query(source)).__name__ == "Linear8bitLt"

    stores = count_stores(monkeypatch)
    cached = load(tiny_model)
    assert stores == []  # read, not quantised and written again
    assert first_query(cached).weight.dtype == torch.int8
    x = torch.randn(2, 5, first_query(source).in_features, dtype=torch.bfloat16)
    torch.testing.assert_close(first_query(cached)(x), first_query(source)(x), rtol=0, atol=0)

    # A truncated weight file: the entry is refused (named in the warning), removed, and rewritten.
    weights = next(cache.directory.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    caplog.clear()
    again = load(tiny_model)
    assert "is damaged" in caplog.text and weights.name in caplog.text and stores == [1]
    torch.testing.assert_close(first_query(again)(x), first_query(source)(x), rtol=0, atol=0)
    assert cache.lookup() == cache.directory


def test_trials_starting_together_quantise_once(tiny_model, cache_root, monkeypatch):
    stores, start = count_stores(monkeypatch), threading.Barrier(2)
    threads = [threading.Thread(target=lambda: (start.wait(), load(tiny_model))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert stores == [1]


def test_another_precision_or_rewritten_weights_are_another_entry(tiny_model, tmp_path):
    int8 = quantized_cache(tmp_path, str(tiny_model), None, "int8", torch.bfloat16)
    assert quantized_cache(tmp_path, str(tiny_model), None, "nf4", torch.bfloat16).directory != int8.directory
    assert quantized_cache(tmp_path, str(tiny_model), None, "int8", torch.float32).directory != int8.directory
    copy = tmp_path / "copy"
    shutil.copytree(tiny_model, copy)
    before = quantized_cache(tmp_path, str(copy), None, "int8", torch.bfloat16).directory
    weights = next(copy.glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # as a rewrite would
    assert quantized_cache(tmp_path, str(copy), None, "int8", torch.bfloat16).directory != before
    # A hub id that is not in the local HF cache: unknown until its first load, so not cached.
    assert quantized_cache(tmp_path, "Salesforce/blip2-flan-t5-xl", None, "int8", torch.bfloat16) is None
