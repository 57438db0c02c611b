"""The 4-trial sweep the way the field writes it today: HF `Trainer.hyperparameter_search(backend="ray")`.

Issue "Sweep speed on one GPU" asks how our sweep (bench/gpu_sweep_speed.sh) compares with the usual recipe:
a `model_init(trial)` that loads BLIP-2 in int8 (bitsandbytes), runs PEFT's `prepare_model_for_kbit_training`
(as the PEFT docs recommend for k-bit training) and adds LoRA of the trial's rank on the T5 `q`, `v`; a data
collator that runs the `Blip2Processor` on every batch (images + prompts, answers as labels, padding -> -100);
the frozen vision tower recomputed at every step (no feature cache); `eval_loss` on a held-out slice as the
objective (the HF default). The same grid as ours: lora_rank 8/16 x n_samples 800/1600, 2 epochs, lr 1e-4,
4 trials sharing the GPU at 0.25 (CUDA MPS), 3 CPUs each. It measures per trial the Trainer's own
`train_samples_per_second`, samples/s of training alone (its eval time taken out), peak GPU memory
(`torch.cuda.max_memory_allocated`, reset when training starts, so weights + activations + in-loop eval), the
model load and the trial's wall time; and the whole script's wall time. Table in OUT_DIR/hf_baseline.md, all
numbers in OUT_DIR/hf_baseline.json.

    python bench/hf_baseline.py MODEL_DIR DATA_DIR OUT_DIR [--precision int8|fp32] [--gpu-per-trial 0.25]
        [--cpu-per-trial 3] [--epochs 2] [--scale 1.0] [--limit-train N] [--eval-questions 192] [--num-cpus N]
    bash bench/gpu_hf_baseline.sh                                   # on the GPU host (full-size model)
    # CPU smoke test (tiny model; HF_HUB_OFFLINE=1 RAY_AUTH_MODE=disabled):
    python bench/vqa_rad_like.py /tmp/hfb-data runner/tiny/artifact
    python bench/hf_baseline.py runner/tiny/artifact /tmp/hfb-data /tmp/hfb-out --precision fp32 \
        --gpu-per-trial 0 --cpu-per-trial 1 --num-cpus 2 --scale 0.05 --eval-questions 32 --workers 0

Its best settings, not a straw man: bf16 autocast where the card has it; `dataloader_num_workers` 2 with
persistent workers (the processor runs in them, off the training thread); no gradient checkpointing
(`use_gradient_checkpointing=False`: PEFT's default is on and costs ~30% compute); `save_strategy="no"`
(a trial writes no checkpoint, so nothing of the 4 trials' time goes to disk; the price is that Tune cannot
resume a trial); `report_to="none"`; no tqdm; loss logged every 50 steps (each log is a device sync).
One deviation from the plain recipe, in its favour: after the driver's `Trainer(model_init=...)` builds its
one model (the Trainer requires it), we drop the driver's references to it. `run_hp_search_ray` clears only
`trainer.model` before Ray pickles the whole trainer into its object store (transformers/integrations/
integration_utils.py), so `model_wrapped` and the callback handler would carry a full model to every trial.

What is honest and what is not about the comparison:
- `max_steps` stands for n_samples: `hyperparameter_search` trains on one fixed train dataset, so a trial of
  n_samples questions runs `epochs * ceil(n_samples / batch_size)` steps (eval every `ceil(n_samples /
  batch_size)` steps, i.e. "per epoch") over the whole train split (`dataloader_drop_last`: every step has 16
  questions): the same number of steps and of samples per step as ours, other questions. Samples/s is what is
  compared, not accuracy (random weights anyway).
- Batch 16, as our run (search_spaces/vqa_rad.yaml sets `batch_size: 16`; TrialConfig's default is 8);
  LoRA alpha 16 and dropout 0.05 (TrialConfig defaults: alpha fixed, not 2 x rank), warmup 10% then linear
  decay, AdamW, gradient clipping 1.0, weight decay 0: our trial's schedule. Prompt `tasks.common.PROMPT`,
  labels `tasks.common.normalize_answer(answer)`: the same tokens as our trial.
- The HF way tokenises per batch and recomputes the frozen ViT + Q-Former for every sample at every step; we
  compute image features once per image per node. That difference is the point of the comparison.
- It validates by `eval_loss` on 192 held-out train questions (forward passes) per epoch, not by our greedy
  decoding + exact match (+ the shuffled-image control) on the validation split, and it has no promotion,
  zero-shot, one-shot or report phase: compare its trial phase with our sweep's trial phase, and its whole
  wall time with ours minus our post-sweep phase.
- The Trainer's `train_samples_per_second` counts in-loop evaluation in its time; "train-only" takes it out.
- No node cache of quantised weights: each trial quantises the source weights (as ours does with a cold cache
  for the first trial only).
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import sys
import time
import weakref
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    Blip2ForConditionalGeneration,
    Blip2Processor,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tasks.common import PROMPT, normalize_answer  # noqa: E402

LORA_RANKS = (8, 16)
N_SAMPLES = (800, 1600)
LEARNING_RATE = 1e-4
BATCH_SIZE = 16  # search_spaces/vqa_rad.yaml, what bench/gpu_sweep_speed.sh runs
EVAL_BATCH_SIZE = 32  # TrialConfig.eval_batch_size
LORA_ALPHA, LORA_DROPOUT, LORA_TARGETS = 16.0, 0.05, ["q", "v"]  # TrialConfig defaults ("q,v": T5 attention)
WARMUP, MAX_GRAD_NORM, WEIGHT_DECAY, SEED = 0.1, 1.0, 0.0, 0


@dataclass(frozen=True)
class Settings:
    """One run of the baseline (the command line)."""

    model_dir: str
    """A saved BLIP-2 (Flan-T5) directory: bench/full_size.py's output, or runner/tiny/artifact."""
    data_dir: str
    """VQA-RAD-layout parquet (bench/vqa_rad_like.py): train-*.parquet with image, question, answer."""
    out_dir: str
    """Where the table, the numbers and the per-trial records go."""
    precision: str = "int8"
    """int8 (bitsandbytes, CUDA only) or fp32 (the CPU smoke test; bf16 autocast on a GPU that has it)."""
    gpu_per_trial: float = 0.25
    cpu_per_trial: float = 3.0
    epochs: int = 2
    scale: float = 1.0
    """Multiplies the n_samples grid (0.05 for a CPU smoke run)."""
    limit_train: int | None = None
    """Keep only this many training questions (after the held-out slice is taken)."""
    eval_questions: int = 192
    """Held-out train questions for eval_loss: 6 batches of 32 (drop_last applies to evaluation too)."""
    workers: int = 2
    """DataLoader worker processes per trial (the processor runs in them)."""
    num_cpus: int | None = None
    """CPUs of the local Ray instance (None: all of the machine's)."""
    storage: str = "/tmp/hf-baseline-ray"
    """Ray Tune's results and the Trainer's output_dir (nothing is saved there with save_strategy="no")."""

    @property
    def n_samples(self) -> list[int]:
        return [max(1, round(n * self.scale)) for n in N_SAMPLES]

    def steps_per_epoch(self, n_samples: int) -> int:
        return math.ceil(n_samples / BATCH_SIZE)

    @property
    def bf16(self) -> bool:
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


@dataclass
class VqaCollator:
    """What a user writes today: the processor on every batch (decode, resize, normalise, tokenise)."""

    processor: Blip2Processor

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.processor(images=[row["image"].convert("RGB") for row in rows],
                               text=[PROMPT.format(question=row["question"]) for row in rows],
                               padding=True, return_tensors="pt")
        tokenizer = self.processor.tokenizer
        labels = tokenizer([normalize_answer(row["answer"]) for row in rows], padding=True,
                           return_tensors="pt")["input_ids"]
        labels[labels == tokenizer.pad_token_id] = -100
        return {**batch, "labels": labels}


class TrialRecorder(TrainerCallback):
    """Per trial: model load, Trainer's speed metrics, eval time and loss, peak GPU memory, wall time, written
    to OUT_DIR/trials/<trial id>.json at every evaluation and at the end (a cut-off run keeps what it had)."""

    def __init__(self, out_dir: Path):
        self.out_dir = out_dir
        self.record: dict[str, Any] = {}

    def start(self, trial: dict[str, Any]) -> None:
        import ray.tune

        self.record = {"trial_id": ray.tune.get_context().get_trial_id(), "status": "loading",
                       **{key: trial[key] for key in ("lora_rank", "n_samples", "max_steps")},
                       "started": time.time(), "eval_loss": [], "eval_s": 0.0}

    def loaded(self) -> None:
        if self.record:
            self.record["model_init_s"] = time.time() - self.record["started"]

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.record:
            return
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.record.update(status="training", train_began=time.time())
        self.save(step=0)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if self.record and metrics:
            self.record["eval_loss"].append(metrics.get("eval_loss"))
            self.record["eval_s"] += metrics.get("eval_runtime", 0.0)
            self.save(step=state.global_step)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.record and logs and "train_samples_per_second" in logs:
            self.record.update({key: logs[key] for key in ("train_runtime", "train_samples_per_second", "train_loss")})
            samples = state.global_step * args.per_device_train_batch_size
            train_only = max(logs["train_runtime"] - self.record["eval_s"], 1e-9)
            self.record["train_only_samples_per_second"] = samples / train_only

    def on_train_end(self, args, state, control, **kwargs):
        if self.record:
            self.record["status"] = "done"
            self.save(step=state.global_step)

    def save(self, step: int) -> None:
        peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
        self.record.update(step=step, peak_gib=peak, ended=time.time(), wall_s=time.time() - self.record["started"])
        folder = self.out_dir / "trials"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{self.record['trial_id']}.json").write_text(json.dumps(self.record, indent=1))


def model_init(settings: Settings, recorder: TrialRecorder, trial: dict[str, Any] | None):
    """BLIP-2 at the run's precision, PEFT's k-bit preparation for int8, LoRA of the trial's rank on T5 q, v.
    trial is None once, in the driver: `Trainer.__init__` builds a model before any search starts."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if trial is not None:
        recorder.start(trial)
    if settings.precision == "int8":
        from transformers import BitsAndBytesConfig

        model = Blip2ForConditionalGeneration.from_pretrained(
            settings.model_dir, quantization_config=BitsAndBytesConfig(load_in_8bit=True),
            dtype=torch.bfloat16 if settings.bf16 else torch.float32, device_map={"": torch.cuda.current_device()})
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    else:
        model = Blip2ForConditionalGeneration.from_pretrained(settings.model_dir, dtype=torch.float32)
    rank = trial["lora_rank"] if trial is not None else LORA_RANKS[0]
    lora = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=LORA_DROPOUT, target_modules=LORA_TARGETS,
                      bias="none")
    model = get_peft_model(model, lora)
    recorder.loaded()
    return model


def hp_space(settings: Settings, _trial: None) -> dict[str, Any]:
    """Ray Tune's space: the 2 x 2 grid; max_steps and eval_steps derived from n_samples (see the docstring)."""
    from ray import tune

    return {
        "lora_rank": tune.grid_search(list(LORA_RANKS)),
        "n_samples": tune.grid_search(settings.n_samples),
        "max_steps": tune.sample_from(lambda config: settings.epochs * settings.steps_per_epoch(config["n_samples"])),
        "eval_steps": tune.sample_from(lambda config: settings.steps_per_epoch(config["n_samples"])),
    }


def load_data(settings: Settings):
    import datasets

    files = sorted(str(path) for path in Path(settings.data_dir).glob("train-*.parquet"))
    if not files:
        sys.exit(f"data: no train-*.parquet in {settings.data_dir} (bench/vqa_rad_like.py writes them)")
    split = datasets.load_dataset("parquet", data_files={"train": files}, split="train").train_test_split(
        test_size=settings.eval_questions, seed=SEED)
    train = split["train"]
    if settings.limit_train is not None:
        train = train.select(range(min(settings.limit_train, len(train))))
    return train, split["test"]


def training_arguments(settings: Settings) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(Path(settings.storage) / "trainer"),
        per_device_train_batch_size=BATCH_SIZE, per_device_eval_batch_size=EVAL_BATCH_SIZE,
        learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY, max_grad_norm=MAX_GRAD_NORM,
        lr_scheduler_type="linear", warmup_steps=WARMUP,  # a float < 1 is a ratio (5.17 and 5.24)
        max_steps=settings.epochs * settings.steps_per_epoch(max(settings.n_samples)),  # per trial: hp_space
        eval_strategy="steps", eval_steps=settings.steps_per_epoch(max(settings.n_samples)),
        save_strategy="no", logging_strategy="steps", logging_steps=50, report_to="none", disable_tqdm=True,
        bf16=settings.bf16, remove_unused_columns=False, label_names=["labels"], prediction_loss_only=True,
        dataloader_drop_last=True,  # every step 16 questions: the Trainer's samples/s counts max_steps x 16
        dataloader_num_workers=settings.workers, dataloader_persistent_workers=settings.workers > 0,
        seed=SEED, data_seed=SEED,
    )


def run(settings: Settings) -> dict[str, Any]:
    import ray

    began = time.time()
    out = Path(settings.out_dir)
    if settings.precision == "int8" and not torch.cuda.is_available():
        sys.exit("precision: int8 needs a CUDA GPU (bitsandbytes); use --precision fp32 --gpu-per-trial 0 on CPU")
    (out / "trials").mkdir(parents=True, exist_ok=True)
    for stale in (out / "trials").glob("*.json"):
        stale.unlink()
    phases: dict[str, float] = {}

    root = str(Path(__file__).resolve().parent.parent)  # the trials unpickle tasks.common: Ray's workers import it
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    ray.init(address="local", num_cpus=settings.num_cpus, include_dashboard=False,
             _temp_dir="/tmp/ray-hf-baseline", log_to_driver=True)
    phases["ray_init_s"] = time.time() - began

    train, held_out = load_data(settings)
    processor = Blip2Processor.from_pretrained(settings.model_dir)
    recorder = TrialRecorder(out)
    mark = time.time()
    trainer = Trainer(model_init=functools.partial(model_init, settings, recorder), args=training_arguments(settings),
                      data_collator=VqaCollator(processor), train_dataset=train, eval_dataset=held_out,
                      callbacks=[recorder])
    phases["driver_model_init_s"] = time.time() - mark
    # The driver's own model is not needed by any trial: without this, Ray's pickle of the trainer carries it.
    driver_model = weakref.ref(trainer.model)
    trainer.model = trainer.model_wrapped = trainer.callback_handler.model = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    print(f"driver's model_init model freed before the search: {driver_model() is None}", flush=True)

    resources = {"cpu": settings.cpu_per_trial, **({"gpu": settings.gpu_per_trial} if settings.gpu_per_trial else {})}
    mark = time.time()
    best = None
    try:
        best = trainer.hyperparameter_search(
            hp_space=functools.partial(hp_space, settings), compute_objective=lambda metrics: metrics["eval_loss"],
            n_trials=1,  # num_samples: the grid runs once (4 trials)
            direction="minimize", backend="ray", resources_per_trial=resources,
            storage_path=settings.storage, name=f"hf-baseline-{int(began)}", raise_on_failed_trial=False, verbose=1)
    finally:
        phases["search_s"] = time.time() - mark
        phases["total_s"] = time.time() - began
        result = summarise(settings, out, phases, best)
        ray.shutdown()
    return result


def summarise(settings: Settings, out: Path, phases: dict[str, float], best) -> dict[str, Any]:
    trials = sorted((json.loads(path.read_text()) for path in (out / "trials").glob("*.json")),
                    key=lambda t: (t["lora_rank"], t["n_samples"]))
    if trials:
        phases["trials_window_s"] = max(t["ended"] for t in trials) - min(t["started"] for t in trials)
    lines = ["| lora_rank | n_samples → max_steps | samples/s (Trainer) | samples/s (train only) | peak GiB "
             "| eval_loss | model load s | trial wall s | status |", "| --- " * 9 + "|"]
    for t in trials:
        lines.append(f"| {t['lora_rank']} | {t['n_samples']} → {t['max_steps']} "
                     f"| {fmt(t.get('train_samples_per_second'))} "
                     f"| {fmt(t.get('train_only_samples_per_second'))} | {fmt(t.get('peak_gib'), 2)} "
                     f"| {fmt(t['eval_loss'][-1] if t['eval_loss'] else None, 4)} | {fmt(t.get('model_init_s'))} "
                     f"| {fmt(t.get('wall_s'))} | {t['status']} |")
    lines.append("")
    lines.append(f"wall: total {phases['total_s']:.1f} s after imports (Ray start {phases['ray_init_s']:.1f} s, "
                 f"driver model_init {phases.get('driver_model_init_s', 0):.1f} s, "
                 f"hyperparameter_search {phases.get('search_s', 0):.1f} s, "
                 f"first trial start → last trial end {phases.get('trials_window_s', 0):.1f} s); "
                 f"{sum(t['status'] == 'done' for t in trials)}/4 trials done")
    if best is not None:
        lines.append(f"HF's best run: {best.run_id} (objective {best.objective:.4f}, {best.hyperparameters})")
    table = "\n".join(lines)
    print(table, flush=True)
    import peft
    import ray
    import transformers

    versions = {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
                "ray": ray.__version__}
    result = {"settings": asdict(settings), "versions": versions, "phases": phases, "trials": trials,
              "batch_size": BATCH_SIZE, "bf16_autocast": settings.bf16}
    (out / "hf_baseline.md").write_text(table + "\n")
    (out / "hf_baseline.json").write_text(json.dumps(result, indent=1, default=str))
    return result


def fmt(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def parse(argv: list[str]) -> Settings:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir")
    parser.add_argument("data_dir")
    parser.add_argument("out_dir")
    parser.add_argument("--precision", choices=["int8", "fp32"], default="int8")
    parser.add_argument("--gpu-per-trial", type=float, default=0.25)
    parser.add_argument("--cpu-per-trial", type=float, default=3.0)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the n_samples grid (800, 1600)")
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--eval-questions", type=int, default=192)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers per trial")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray instance")
    parser.add_argument("--storage", default="/tmp/hf-baseline-ray")
    args = parser.parse_args(argv)
    for key in ("model_dir", "data_dir", "out_dir", "storage"):  # Tune runs each trial in its own directory
        setattr(args, key, str(Path(getattr(args, key)).resolve()))
    return Settings(**vars(args))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the collator runs in forked DataLoader workers
    run(parse(sys.argv[1:]))
