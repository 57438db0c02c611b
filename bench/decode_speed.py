"""Post-sweep scoring speed by generation batch size: one `SplitScorer` (the model and the test split's image
features loaded once, as promotion and the stages share it) scores the bare model on the whole test split
(every question, then the shuffled-image control) at each `eval_batch_size`. Prints a table: seconds per
score, generated answers/s, peak GPU memory, and how many answers equal those of the first batch size (greedy
decoding: only padding differs between batch sizes).

    python bench/decode_speed.py MODEL DATA [PRECISION] [BATCH ...]   # e.g. /tmp/full /tmp/vqa-rad int8 32 64 128 256

On the GPU host: `PARTS=decode bash bench/gpu_sweep_speed.sh` (the full-size random-weight model, whose
greedy answers never end before `max_new_tokens`: the slowest case, real answers end sooner).
"""

from __future__ import annotations

import dataclasses
import sys
import time

import torch

from runner.config import TrialConfig
from runner.eval.evaluate import SplitScorer, evaluate


def main(model: str, data: str, precision: str, batch_sizes: list[int]) -> None:
    config = TrialConfig(task="vqa_rad", data=data, model=model, precision=precision, device="auto",
                         max_eval_examples=None, eval_batch_size=batch_sizes[0])
    started = time.perf_counter()
    scorer = SplitScorer(config, "test")
    print(f"scorer: model + {len(scorer.examples)} test questions' features in {time.perf_counter() - started:.1f} s")
    warm_up = scorer.examples[:batch_sizes[0]]  # CUDA kernels, bitsandbytes' first int8 calls
    evaluate(scorer.model, scorer.processor, scorer.task, warm_up, scorer.features, batch_size=len(warm_up),
             max_new_tokens=config.max_new_tokens, control=False)
    rows, first = [], None
    for batch_size in batch_sizes:
        scorer.config = dataclasses.replace(config, eval_batch_size=batch_size)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        evaluation = scorer.score(with_adapter=False)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seconds = time.perf_counter() - began
        answers = [(row["prediction"], row["shuffled_prediction"]) for row in evaluation.rows]
        first = first or answers
        same = sum(a == b for pair, ref in zip(answers, first) for a, b in zip(pair, ref))
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")
        rows.append((batch_size, seconds, 2 * len(answers) / seconds, peak, same, 2 * len(answers),
                     evaluation.scores["exact_match"]))
    print(f"\n{precision}, {len(scorer.examples)} questions + the control, max_new_tokens {config.max_new_tokens}")
    print("| eval_batch_size | seconds per score | answers/s | peak GiB | answers equal to the first batch size's | exact match |")
    print("| --- | --- | --- | --- | --- | --- |")
    for batch_size, seconds, rate, peak, same, total, em in rows:
        print(f"| {batch_size} | {seconds:.1f} | {rate:.1f} | {peak:.1f} | {same}/{total} | {em:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "int8",
         [int(b) for b in sys.argv[4:]] or [32, 64, 128, 256])
