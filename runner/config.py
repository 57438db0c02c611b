"""Typed configuration: one trial (`TrialConfig`) and the checks that make bad values fail early.

YAML and CLI values arrive as plain dicts; `build(cls, values, source)` turns them into a dataclass,
rejecting unknown keys and wrong types with a message that names the key and where it came from.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from runner.errors import UserError

Precision = Literal["int8", "nf4", "bf16", "fp16", "fp32"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
Device = Literal["auto", "cpu", "cuda"]


@dataclass(frozen=True)
class TrialConfig:
    """Everything one trial needs; saved with every checkpoint so resume and promotion need nothing else."""

    task: str = "easy_vqa"
    """Task name (see `tasks.TASKS`): `easy_vqa` (offline quick-start) or `vqa_rad`."""
    data: str | None = None
    """Where the task's data lives: None for its default (hub id or bundled package), else a local path."""
    model: str = "Salesforce/blip2-flan-t5-xl"
    """Hub id or local directory of a BLIP-2 (Flan-T5) checkpoint; `tiny` is the offline test model."""
    model_revision: str | None = None
    """Hub revision (commit sha) of `model`; ignored for local directories."""
    precision: Precision = "int8"
    """Weights precision: int8/nf4 (bitsandbytes, CUDA only), bf16, fp16, fp32."""
    device: Device = "auto"
    """`auto` picks CUDA when present."""
    lora_rank: int = 8
    """LoRA rank r on the Flan-T5 attention q and v."""
    lora_alpha: float = 16.0
    """LoRA scaling numerator (scale = alpha / rank)."""
    lora_dropout: float = 0.05
    """Dropout on the LoRA input."""
    learning_rate: float = 1e-4
    """Peak AdamW learning rate (after linear warmup, then linear decay to 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay on the LoRA weights."""
    warmup_ratio: float = 0.1
    """Fraction of optimizer steps spent warming up."""
    n_samples: int | None = None
    """Training questions per epoch, drawn by a seeded shuffle of the train split; None = all."""
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
    eval_batch_size: int = 32
    """Questions per greedy-generation batch in validation/test."""
    max_eval_examples: int | None = 500
    """Validation questions scored per epoch (a fixed seeded subset); None = the whole split."""
    max_new_tokens: int = 10
    """Greedy decoding length limit (VQA answers are short)."""
    seed: int = 0
    """Seeds the sample draw, LoRA init, dropout and data order."""
    val_fraction: float = 0.1
    """Fraction of training images carved out (by image) as the validation split."""
    skip_bad_images: bool = False
    """Skip (and count) unreadable images instead of failing on the first."""

    def __post_init__(self) -> None:
        checks = {
            "lora_rank": self.lora_rank >= 1,
            "lora_alpha": self.lora_alpha > 0,
            "lora_dropout": 0.0 <= self.lora_dropout < 1.0,
            "learning_rate": self.learning_rate > 0,
            "weight_decay": self.weight_decay >= 0,
            "warmup_ratio": 0.0 <= self.warmup_ratio < 1.0,
            "n_samples": self.n_samples is None or self.n_samples >= 1,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 1,
            "grad_accum": self.grad_accum >= 1,
            "max_grad_norm": self.max_grad_norm >= 0,
            "gpu_memory_gib": self.gpu_memory_gib is None or self.gpu_memory_gib > 0,
            "eval_batch_size": self.eval_batch_size >= 1,
            "max_eval_examples": self.max_eval_examples is None or self.max_eval_examples >= 1,
            "max_new_tokens": self.max_new_tokens >= 1,
            "val_fraction": 0.0 < self.val_fraction < 1.0,
        }
        for key, ok in checks.items():
            if not ok:
                raise UserError(f"{key}: invalid value {getattr(self, key)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


T = TypeVar("T")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field: one source of help for the CLI and the docs."""
    import ast
    import inspect
    import textwrap

    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = following.value.value
    return docs


def build(cls: type[T], values: dict[str, Any], source: str) -> T:
    """Build dataclass `cls` from `values`; unknown keys and wrong types name the key and `source`."""
    if not isinstance(values, dict):
        raise UserError(f"{source}: expected a mapping, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"{source}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    hints = typing.get_type_hints(cls)
    converted = {key: coerce(value, hints[key], f"{source}: {key}") for key, value in values.items()}
    try:
        return cls(**converted)
    except UserError as error:
        raise UserError(f"{source}: {error}") from None


def coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a simple annotation (int, float, str, bool, Literal, Optional)."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return coerce(value, option, where)
            except UserError as error:
                errors.append(str(error))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is Literal:
        if value not in get_args(annotation):
            raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, get_args(annotation)))}")
        return value
    if dataclasses.is_dataclass(annotation) or annotation in (dict, list) or get_origin(annotation) in (dict, list):
        expected = get_origin(annotation) or annotation
        if isinstance(value, expected):
            return value
        raise UserError(f"{where}: expected a mapping, got {value!r}")
    if annotation is bool:
        if isinstance(value, bool):
            return value
    elif annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads `5e-4` (no dot) as a string: accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
    elif annotation is str:
        if isinstance(value, str):
            return value
    else:
        return value
    raise UserError(f"{where}: expected {annotation.__name__}, got {value!r}")


DOMAINS = ("grid", "choice", "uniform", "loguniform", "randint", "lograndint")


@dataclass(frozen=True)
class SchedulerConfig:
    """Early stopping of bad trials between epochs."""

    type: Literal["asha", "none"] = "asha"
    """`asha` (Async Successive Halving) or `none` (every trial runs all epochs)."""
    grace_period: int = 1
    """Epochs every trial gets before ASHA may stop it."""
    reduction_factor: int = 2
    """ASHA keeps the top 1/reduction_factor of trials at each rung."""

    def __post_init__(self) -> None:
        if self.grace_period < 1:
            raise UserError(f"grace_period: invalid value {self.grace_period!r}")
        if self.reduction_factor < 2:
            raise UserError(f"reduction_factor: invalid value {self.reduction_factor!r}")


@dataclass(frozen=True)
class ResourcesConfig:
    """What one trial's Ray Train worker asks for."""

    gpu: float = 0.0
    """GPUs per trial: 0 (CPU), a fraction in (0, 1) to pack trials on one card, or 1."""
    cpu: float = 1.0
    """CPUs per trial worker (also its torch thread count, rounded down, at least 1)."""

    def __post_init__(self) -> None:
        if not (self.gpu == 0 or 0 < self.gpu <= 1):
            raise UserError(f"gpu: {self.gpu!r} must be 0 or a fraction in (0, 1]")
        if self.cpu <= 0:
            raise UserError(f"cpu: {self.cpu!r} must be > 0")


@dataclass(frozen=True)
class SweepConfig:
    """A search space file (search_spaces/*.yaml): what to vary, how to pick, where to record."""

    name: str
    """Sweep name: the Ray Tune run name and the MLflow parent run name."""
    trial: TrialConfig
    """Base values of every trial (any TrialConfig key)."""
    space: dict[str, dict[str, Any]]
    """TrialConfig keys to vary, each `{grid|choice: [...]}` or `{uniform|loguniform|randint|lograndint: [low, high]}`."""
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

    def __post_init__(self) -> None:
        if not self.space:
            raise UserError("space: empty search space (name at least one key to vary)")
        if self.num_samples < 1:
            raise UserError(f"num_samples: invalid value {self.num_samples!r}")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise UserError(f"max_concurrent_trials: invalid value {self.max_concurrent_trials!r}")
        if self.max_failures < 0:
            raise UserError(f"max_failures: invalid value {self.max_failures!r}")
        check_tracking_uri(self.tracking_uri, "tracking_uri")

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


def check_tracking_uri(uri: str | None, where: str) -> None:
    """MLflow prints the tracking URI in its own messages ("View run at ..."): no secrets in it."""
    if uri and re.match(r"^\w+://[^/@]+@", uri):
        raise UserError(f"{where}: the URI holds credentials, which MLflow would print; set "
                        "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) instead")


def check_space(space: dict[str, Any], base: TrialConfig, source: str) -> dict[str, dict[str, Any]]:
    """Every varied key is a TrialConfig field and every value it can take passes TrialConfig's checks."""
    if not isinstance(space, dict):
        raise UserError(f"{source}: space: expected a mapping of keys to domains")
    known = {f.name for f in fields(TrialConfig)}
    checked: dict[str, dict[str, Any]] = {}
    for key, domain in space.items():
        where = f"{source}: space.{key}"
        if key not in known:
            raise UserError(f"{where}: unknown trial key (known: {', '.join(sorted(known))})")
        if not isinstance(domain, dict) or len(domain) != 1 or next(iter(domain)) not in DOMAINS:
            raise UserError(f"{where}: expected one of {', '.join(f'{{{d}: ...}}' for d in DOMAINS)}")
        kind, values = next(iter(domain.items()))
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}.{kind}: expected a non-empty list")
        # Each value must make a valid trial; building one also converts it (YAML reads 1e-4 as text).
        values = [getattr(build(TrialConfig, {**base.to_dict(), key: value}, where), key) for value in values]
        if kind not in ("grid", "choice"):
            if len(values) != 2 or not values[0] < values[1]:
                raise UserError(f"{where}.{kind}: expected [low, high] with low < high, got {values!r}")
            if kind.startswith("log") and values[0] <= 0:
                raise UserError(f"{where}.{kind}: a log scale needs low > 0, got {values[0]!r}")
        checked[key] = {kind: values}
    return checked


def load_sweep(path: Path, overrides: list[str] = ()) -> SweepConfig:
    """Read a search space YAML and apply `key=value` / `trial.key=value` overrides."""
    import yaml

    source = str(path)
    try:
        values = yaml.safe_load(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{source}: no such file") from None
    except yaml.YAMLError as error:
        raise UserError(f"{source}: not valid YAML: {str(error).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UserError(f"{source}: expected a mapping at the top level")
    for override in overrides:
        key, sep, raw = override.partition("=")
        if not sep or not key:
            raise UserError(f"override {override!r}: expected key=value")
        target = values
        *parents, leaf = key.split(".")
        for parent in parents:
            target = target.setdefault(parent, {})
            if not isinstance(target, dict):
                raise UserError(f"override {override!r}: {parent} is not a mapping")
        target[leaf] = yaml.safe_load(raw)
    return sweep_from_dict(values, source)


def sweep_from_dict(values: dict[str, Any], source: str) -> SweepConfig:
    """A SweepConfig from plain values (a YAML file, or the copy logged to the sweep's MLflow run)."""
    values = dict(values)
    sections = {"trial": TrialConfig, "scheduler": SchedulerConfig, "resources": ResourcesConfig}
    for section, cls in sections.items():
        if section in values:
            values[section] = build(cls, values[section] or {}, f"{source}: {section}")
    if "space" in values:
        values["space"] = check_space(values["space"], values.get("trial", TrialConfig()), source)
    if "name" not in values:
        raise UserError(f"{source}: missing key 'name'")
    return build(SweepConfig, values, source)
