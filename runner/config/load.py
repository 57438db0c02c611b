"""From YAML and `key=value` overrides to typed configs, with every problem of a file reported at once.

Each problem names its key and the bound or type it breaks ("trial.lora_rank: 0 is below 1"); all
of a file's problems go into one UserError (one line, exit code 2).
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

from runner.config.schema import (
    DOMAIN_KINDS,
    Domain,
    ResourcesConfig,
    SchedulerConfig,
    SweepConfig,
    TrialConfig,
)
from runner.errors import UserError

T = TypeVar("T")


class Problems(list):
    """Problems found so far, each `prefix + key: what is wrong`; `raise_any` raises them as one error."""

    def raise_any(self, source: str) -> None:
        if self:
            raise UserError(f"{source}: " + "; ".join(self))


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field: one source of help for the CLI and the docs."""
    body = ast.parse(textwrap.dedent(inspect.getsource(cls))).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = following.value.value
    return docs


def build(cls: type[T], values: Any, source: str) -> T:
    """Build dataclass `cls` from plain `values`; every unknown key, wrong type and broken bound is
    reported in one error naming `source`."""
    problems = Problems()
    built = collect(cls, values, "", problems)
    problems.raise_any(source)
    return built  # type: ignore[return-value]


def collect(cls: type[T], values: Any, prefix: str, problems: Problems) -> T | None:
    """`cls(**values)` checked; what is wrong goes to `problems` (keys prefixed with `prefix`)."""
    if not isinstance(values, dict):
        problems.append(f"{prefix.rstrip('.') or 'top level'}: expected a mapping, got {values!r}")
        return None
    known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
    for key in sorted(set(values) - known):
        problems.append(f"{prefix}{key}: unknown key (known: {', '.join(sorted(known))})")
    hints = typing.get_type_hints(cls)
    before = len(problems)
    converted = {}
    for key, value in values.items():
        if key in known:
            try:
                converted[key] = coerce(value, hints[key])
            except TypeError as error:
                problems.append(f"{prefix}{key}: {error}")
    missing = [f.name for f in fields(cls) if f.name not in values  # type: ignore[arg-type]
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    problems.extend(f"{prefix}{key}: missing" for key in missing)
    if missing:
        return None
    # Bounds are checked on a bare instance (defaults where a value was bad) so every break is reported.
    instance = object.__new__(cls)
    for spec in fields(cls):  # type: ignore[arg-type]
        object.__setattr__(instance, spec.name, converted.get(spec.name, spec.default))
    problems.extend(prefix + problem for problem in instance.problems())
    return None if len(problems) > before else cls(**converted)


def coerce(value: Any, annotation: Any) -> Any:
    """`value` checked against a simple annotation (int, float, str, bool, Literal, Optional, dataclass,
    dict); raises TypeError saying what was expected."""
    origin = get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [option for option in get_args(annotation) if option is not type(None)]
        if value is None and len(options) < len(get_args(annotation)):
            return None
        errors = []
        for option in options:
            try:
                return coerce(value, option)
            except TypeError as error:
                errors.append(str(error))
        raise TypeError(errors[0])
    if origin is Literal:
        if value not in get_args(annotation):
            raise TypeError(f"{value!r} is not one of {', '.join(map(str, get_args(annotation)))}")
        return value
    if dataclasses.is_dataclass(annotation) or annotation is dict or origin is dict:
        if isinstance(value, (dict, annotation if dataclasses.is_dataclass(annotation) else dict)):
            return value
        raise TypeError(f"expected a mapping, got {value!r}")
    if annotation is bool and isinstance(value, bool):
        return value
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # PyYAML reads `5e-4` (no dot) as a string: accept any float literal.
            try:
                return float(value)
            except ValueError:
                pass
    if annotation is str and isinstance(value, str):
        return value
    if annotation not in (bool, int, float, str):
        return value
    raise TypeError(f"expected {annotation.__name__}, got {value!r}")


def parse_space(space: Any, base: TrialConfig | None, problems: Problems) -> dict[str, Domain]:
    """Every varied key is a TrialConfig field and every value it can take passes TrialConfig's checks."""
    if not isinstance(space, dict):
        problems.append("space: expected a mapping of trial keys to domains")
        return {}
    known = {f.name for f in fields(TrialConfig)}
    base_values = (base or TrialConfig()).to_dict()
    parsed: dict[str, Domain] = {}
    derived: dict[str, list] = {}
    for key, domain in space.items():
        where = f"space.{key}"
        if key not in known:
            problems.append(f"{where}: unknown trial key (known: {', '.join(sorted(known))})")
            continue
        if not isinstance(domain, dict) or len(domain) != 1 or next(iter(domain)) not in DOMAIN_KINDS:
            problems.append(f"{where}: expected one of {', '.join(f'{{{d}: ...}}' for d in DOMAIN_KINDS)}")
            continue
        kind, raw = next(iter(domain.items()))
        if not isinstance(raw, list) or not raw:
            problems.append(f"{where}.{kind}: expected a non-empty list")
            continue
        if kind == "times":  # needs the domain of the key it is computed from: after the others
            derived[key] = raw
            continue
        values = checked_values(key, raw, base_values, where, problems)
        if values is None:
            continue
        if kind not in ("grid", "choice"):
            if len(values) != 2 or not values[0] < values[1]:
                problems.append(f"{where}.{kind}: expected [low, high] with low < high, got {values!r}")
                continue
            if kind.startswith("log") and values[0] <= 0:
                problems.append(f"{where}.{kind}: a log scale needs low > 0, got {values[0]!r}")
                continue
        parsed[key] = Domain(kind, tuple(values))
    for key, raw in derived.items():
        domain = parse_times(key, raw, parsed, derived, base_values, known, problems)
        if domain is not None:
            parsed[key] = domain
    return parsed


def checked_values(key: str, raw: list, base_values: dict, where: str, problems: Problems) -> list | None:
    """`raw` converted; None (and problems noted) unless each value makes a valid trial."""
    values, bad = [], Problems()
    for value in raw:  # building a trial with each value also converts it
        trial = collect(TrialConfig, {**base_values, key: value}, "", bad)
        values.append(getattr(trial, key, None))
    if bad:
        problems.extend(f"{where}: {problem.removeprefix(key + ': ')}" for problem in dict.fromkeys(bad))
        return None
    return values


def parse_times(key: str, raw: list, parsed: dict[str, Domain], derived: dict[str, list], base_values: dict,
                known: set[str], problems: Problems) -> Domain | None:
    """`key: {times: [factor, source]}`: every value factor × source can take must make a valid trial."""
    where = f"space.{key}.times"
    if (len(raw) != 2 or isinstance(raw[0], bool) or not isinstance(raw[0], (int, float))
            or not isinstance(raw[1], str)):
        problems.append(f"{where}: expected [factor, trial key] (lora_alpha: {{times: [2, lora_rank]}}), got {raw!r}")
        return None
    factor, source = raw
    if source not in known or source == key:
        problems.append(f"{where}: {source!r} is not another trial key")
        return None
    if source in derived:
        problems.append(f"{where}: {source} is itself computed (times); name a drawn or fixed key")
        return None
    domain = parsed.get(source)  # None: the source is fixed (its trial value)
    sources = list(domain.values) if domain is not None else [base_values[source]]
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in sources):
        problems.append(f"{where}: {source} is not a number")
        return None
    if checked_values(key, [factor * v for v in sources], base_values, f"space.{key}", problems) is None:
        return None
    return Domain("times", (factor, source))


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
    problems = Problems()
    values = dict(values)
    sections = {"trial": TrialConfig, "scheduler": SchedulerConfig, "resources": ResourcesConfig}
    for section, cls in sections.items():
        if section in values:
            # A broken section still lets the top level be checked (with defaults), so all is said at once.
            values[section] = collect(cls, values[section] or {}, f"{section}.", problems) or cls()
    if "space" in values:
        raw = values["space"]
        values["space"] = parse_space(raw, values.get("trial"), problems) or ({"": None} if raw else {})
    sweep = collect(SweepConfig, values, "", problems)
    problems.raise_any(source)
    return sweep
