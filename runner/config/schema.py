"""The typed configs: one trial (`TrialConfig`), one sweep (`SweepConfig`) and a search domain (`Domain`).

Each field's docstring is its help (CLI options, docs). Bounds live in one table per class (`BOUNDS`):
`problems()` lists every value that breaks one, so a file with three mistakes names all three at once.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, get_args

from runner.errors import UserError

Precision = Literal["int8", "nf4", "bf16", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
Device = Literal["auto", "cpu", "cuda"]
DomainKind = Literal["grid", "choice", "uniform", "loguniform", "randint", "lograndint", "times"]
DOMAIN_KINDS: tuple[str, ...] = get_args(DomainKind)
Search = Literal["random", "optuna"]
SEARCHES: tuple[str, ...] = get_args(Search)
# LoRA target names (`TrialConfig.lora_targets`), by the part of BLIP-2 they adapt.
T5_TARGETS = ("q", "k", "v", "o", "wi", "wo")  # Flan-T5 attention and feed-forward (wi: wi_0 and wi_1 when gated)
QFORMER_TARGETS = ("query", "key", "value")  # the Q-Former's self- and cross-attention

Bound = tuple[Callable[[Any], bool], str]  # (holds for a good value, what a bad value breaks)


def at_least(low: float) -> Bound:
    return (lambda v: v >= low, f"is below {low}")


def above(low: float) -> Bound:
    return (lambda v: v > low, f"must be above {low}")


def within(low: float, high: float) -> Bound:  # [low, high)
    return (lambda v: low <= v < high, f"is outside [{low}, {high})")


def optional(bound: Bound) -> Bound:
    check, text = bound
    return (lambda v: v is None or check(v), text)


class Checked:
    """Mixin: `problems()` from the class's BOUNDS; construction fails on the first list of them."""

    BOUNDS: dict[str, Bound] = {}

    def problems(self) -> list[str]:
        found = []
        for key, (holds, text) in self.BOUNDS.items():
            value = getattr(self, key)
            if not holds(value):
                found.append(f"{key}: {value!r} {text}")
        return found

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise UserError("; ".join(problems))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]


@dataclass(frozen=True)
class TrialConfig(Checked):
    """Everything one trial needs; saved with every checkpoint so resume and promotion need nothing else."""

    # --- data
    task: str = "easy_vqa"
    """Task name (see `tasks.TASKS`): `easy_vqa` (offline quick-start), `vqa_rad`, `slake`, `path_vqa`, or `vqa`
    (your own data, named by `data`)."""
    data: str | dict | None = None
    """Where the task's data lives: None for its default (hub id or bundled package), a local path or hub id, or
    a mapping {path, columns, filter, images} (tasks/vqa.py: your own data's column names, e.g. a language filter)."""
    n_samples: int | None = None
    """Training questions per epoch, drawn by a seeded shuffle of the train split; None = all."""
    val_fraction: float = 0.1
    """Fraction of training images carved out (by image) as the validation split."""
    skip_bad_images: bool = False
    """Skip (and count) unreadable images instead of failing on the first."""
    seed: int = 0
    """Seeds the sample draw, LoRA init, dropout and data order."""
    # --- model and LoRA
    model: str = "Salesforce/blip2-flan-t5-xl"
    """Hub id or local directory of a BLIP-2 (Flan-T5) checkpoint; `tiny` is the offline test model."""
    model_revision: str | None = None
    """Hub revision (commit sha) of `model`; ignored for local directories."""
    precision: Precision = "int8"
    """Weights precision: int8/nf4 (bitsandbytes, CUDA only), bf16, fp16, fp32."""
    device: Device = "auto"
    """`auto` picks CUDA when present."""
    lora_rank: int = 8
    """LoRA rank r."""
    lora_targets: str = "q,v"
    """Comma-separated layers LoRA adapts (as LLaMA-Factory's `lora_target`): Flan-T5 `q,k,v,o` (attention),
    `wi,wo` (feed-forward); Q-Former `query,key,value` (the Q-Former then trains, so only the vision tower's
    output is cached). Searchable: `{choice: ["q,v", "q,k,v,o", "q,k,v,o,wi,wo", "q,v,query,value"]}`."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    # --- optimisation
    learning_rate: float = 1e-4
    """Peak AdamW learning rate (after linear warmup, then linear decay to 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    warmup_ratio: float = 0.1
    """Fraction of optimizer steps spent warming up."""
    epochs: int = 1
    """Passes over the n_samples training questions; validation and a checkpoint after each."""
    batch_size: int = 8
    """Questions per forward pass."""
    grad_accum: int = 1
    """Forward passes per optimizer step (the loss is divided by it)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    gradient_checkpointing: bool = False
    """Recompute T5 activations in backward: less memory, ~30% more compute."""
    gpu_memory_gib: float | None = None
    """Cap this trial's GPU memory (GiB): trials sharing a card, or rehearsing a 16 GB T4 on a big one."""
    cache_image_features: bool = True
    """Keep the frozen image path's outputs on this node's disk (RUNNER_CACHE/image-features): the next
    trial, evaluation or stage run on the same model and precision loads them instead of recomputing."""
    # --- evaluation
    eval_batch_size: int = 32
    """Questions per greedy-generation batch in validation/test."""
    max_eval_examples: int | None = 500
    """Validation questions scored per epoch (a fixed seeded subset); None = the whole split."""
    max_new_tokens: int = 10
    """Greedy decoding length limit (VQA answers are short)."""

    BOUNDS = {
        "n_samples": optional(at_least(1)), "val_fraction": (lambda v: 0 < v < 1, "is outside (0, 1)"),
        "lora_rank": at_least(1), "lora_alpha": above(0), "lora_dropout": within(0, 1),
        "learning_rate": above(0), "weight_decay": at_least(0), "warmup_ratio": within(0, 1),
        "epochs": at_least(1), "batch_size": at_least(1), "grad_accum": at_least(1), "max_grad_norm": at_least(0),
        "gpu_memory_gib": optional(above(0)), "eval_batch_size": at_least(1),
        "max_eval_examples": optional(at_least(1)), "max_new_tokens": at_least(1),
    }

    def problems(self) -> list[str]:
        wrong = bad_targets(self.lora_targets)  # not a BOUNDS entry: its message names the wrong layer
        return super().problems() + ([f"lora_targets: {self.lora_targets!r} {wrong}"] if wrong else [])

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.lora_targets.split(","))

    @property
    def trains_qformer(self) -> bool:
        """LoRA in the Q-Former: its output is no longer frozen (the feature cache stops at the vision tower)."""
        return any(name in QFORMER_TARGETS for name in self.target_modules)


def bad_targets(targets: str) -> str:
    """What is wrong with a `lora_targets` value ("" when nothing)."""
    names = [name.strip() for name in targets.split(",")]
    unknown = [name for name in names if name not in T5_TARGETS + QFORMER_TARGETS]
    if unknown:
        return (f"names {', '.join(map(repr, unknown))}: not a LoRA target (Flan-T5: {', '.join(T5_TARGETS)}; "
                f"Q-Former: {', '.join(QFORMER_TARGETS)})")
    if len(set(names)) != len(names):
        return "names a layer twice"
    return ""


# What changes the trained weights: a checkpoint resumes only under the same values of these.
# Evaluation-only and placement fields (device, caching, eval sizes, memory cap) may differ.
TRAINING_FIELDS = ("task", "data", "n_samples", "val_fraction", "skip_bad_images", "seed", "model",
                   "model_revision", "precision", "lora_rank", "lora_targets", "lora_alpha", "lora_dropout",
                   "learning_rate", "weight_decay", "warmup_ratio", "epochs", "batch_size", "grad_accum", "max_grad_norm")
# What changes a bare model's test scores (with `trains_qformer`: which image features an adapter needs): a
# scorer loaded for one trial config serves another only under the same values of these.
SCORING_FIELDS = ("task", "data", "val_fraction", "skip_bad_images", "seed", "model", "model_revision", "precision",
                  "device", "eval_batch_size", "max_eval_examples", "max_new_tokens")


@dataclass(frozen=True)
class Domain:
    """One varied trial key: `grid`/`choice` over values, a `[low, high]` range, or `times: [factor, key]`
    (this key is factor × the trial's value of another key: `lora_alpha: {times: [2, lora_rank]}`); parsed once."""

    kind: DomainKind
    values: tuple[Any, ...]

    @property
    def derived(self) -> bool:
        """Computed from another key of the same trial, not drawn by the searcher."""
        return self.kind == "times"

    def to_tune(self):
        """The Ray Tune domain (a derived key has none: runner/sweep/tuner.py computes it)."""
        from ray import tune

        if self.kind == "grid":
            return tune.grid_search(list(self.values))
        if self.kind == "choice":
            return tune.choice(list(self.values))
        return getattr(tune, self.kind)(*self.values)

    @property
    def largest(self) -> Any:
        """The largest value a trial can draw (a range's upper end); None for a derived key (its values
        were checked against the trial's bounds when the space was read)."""
        present = [v for v in self.values if v is not None]
        return None if self.derived or not present else max(present)

    def as_yaml(self) -> dict[str, list]:
        return {self.kind: list(self.values)}


@dataclass(frozen=True)
class SchedulerConfig(Checked):
    """Early stopping of bad trials between epochs."""

    type: Literal["asha", "none"] = "asha"
    """`asha` (Async Successive Halving) or `none` (every trial runs all epochs)."""
    grace_period: int = 1
    """Epochs every trial gets before ASHA may stop it."""
    reduction_factor: int = 2
    """ASHA keeps the top 1/reduction_factor of trials at each rung."""

    BOUNDS = {"grace_period": at_least(1), "reduction_factor": at_least(2)}


@dataclass(frozen=True)
class ResourcesConfig(Checked):
    """What one trial's Ray Train worker asks for."""

    gpu: float = 0.0
    """GPUs per trial: 0 (CPU), a fraction in (0, 1) to pack trials on one card, or 1."""
    cpu: float = 1.0
    """CPUs per trial worker (also its torch thread count, rounded down, at least 1)."""

    BOUNDS = {"gpu": (lambda v: v == 0 or 0 < v <= 1, "must be 0 or a fraction in (0, 1]"),
              "cpu": above(0)}


@dataclass(frozen=True)
class SweepConfig(Checked):
    """A search space file (search_spaces/*.yaml): what to vary, how to pick, where to record."""

    name: str
    """Sweep name: the Ray Tune run name and the MLflow parent run name."""
    trial: TrialConfig
    """Base values of every trial (any TrialConfig key)."""
    space: dict[str, Domain]
    """TrialConfig keys to vary, each `{grid|choice: [...]}` or `{uniform|loguniform|randint|lograndint: [low, high]}`."""
    search: Search = "random"
    """How trials are drawn: `random` (Tune's seeded random/grid sampling) or `optuna` (Optuna's TPE through
    Ray Tune's OptunaSearch: a model of the results so far picks the next trial; ranges and choices, no grid).
    Both are seeded by `trial.seed` and resumed with the sweep."""
    num_samples: int = 1
    """Tune samples of the space (a grid is repeated num_samples times)."""
    metric: str = "val_exact_match"
    """Reported metric that picks the best trial and drives ASHA."""
    mode: Literal["max", "min"] = "max"
    """Whether `metric` is better high or low."""
    scheduler: SchedulerConfig = SchedulerConfig()
    """Early stopping (ASHA by default)."""
    resources: ResourcesConfig = ResourcesConfig()
    """Per-trial resources."""
    max_concurrent_trials: int | None = None
    """Trials at once; None = as many as the cluster's CPUs/GPUs fit."""
    max_failures: int = 1
    """Restarts of a trial's worker from its last checkpoint after a crash (0 = none)."""
    storage_path: str = "runs/ray"
    """Ray Tune/Train storage (checkpoints, sweep state); shared storage on a cluster."""
    tracking_uri: str | None = None
    """MLflow tracking URI; None = sqlite in ./mlruns (local mode); http://head:5000 on a cluster."""
    experiment: str = "blip2-lora"
    """MLflow experiment name."""
    registered_model: str = "blip2-lora"
    """MLflow registered model the champion is promoted under."""
    promote: bool = True
    """Evaluate the best trial on the test split and promote it at the end of the sweep."""
    test_max_examples: int | None = None
    """Test questions scored for promotion (a fixed seeded subset); None = the whole test split."""

    BOUNDS = {
        "space": (bool, "is empty (name at least one key to vary)"),
        "num_samples": at_least(1), "max_concurrent_trials": optional(at_least(1)), "max_failures": at_least(0),
        "test_max_examples": optional(at_least(1)),
        "registered_model": (lambda v: bool(MODEL_NAME.match(v)),
                             "is not a valid MLflow model name (letters, digits, '.', '_', '-', spaces)"),
    }

    def problems(self) -> list[str]:
        # The URI itself is not repeated: it holds a secret.
        found = super().problems() + ([f"tracking_uri: the URI {CREDENTIALS}"] if has_credentials(self.tracking_uri) else [])
        if self.search == "optuna":  # Optuna samples: there is no grid to walk
            found += [f"space.{key}: grid is not supported by search: optuna (use choice, or search: random)"
                      for key, domain in self.space.items() if domain is not None and domain.kind == "grid"]
        return found

    def to_dict(self) -> dict[str, Any]:
        """Plain values in the YAML's own shape (the copy logged to MLflow reads back with sweep_from_dict)."""
        return {**dataclasses.asdict(self), "space": {key: d.as_yaml() for key, d in self.space.items()}}

    @property
    def storage(self) -> str:
        """`storage_path` as Ray wants it: a URI as given, a local path made absolute."""
        return self.storage_path if "://" in self.storage_path else str(Path(self.storage_path).resolve())

    @property
    def state_dir(self) -> Path:
        """The driver's own small files of this sweep (MLflow run id, outage journal): inside Ray's
        storage when that is local, else in ./runs/sweeps (on a cluster: the head, where the driver runs)."""
        root = Path(self.storage) if "://" not in self.storage else Path("runs") / "sweeps"
        return root / self.name


MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\- ]{0,254}$")
CREDENTIALS = ("holds credentials, which MLflow would print; set MLFLOW_TRACKING_USERNAME and "
               "MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")


def has_credentials(uri: str | None) -> bool:
    return bool(uri and re.match(r"^\w+://[^/@]+@", uri))


def check_tracking_uri(uri: str | None, where: str) -> None:
    """MLflow prints the tracking URI in its own messages ("View run at ..."): no secrets in it."""
    if has_credentials(uri):
        raise UserError(f"{where}: the URI {CREDENTIALS}")
