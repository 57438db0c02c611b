"""Configuration: the typed configs (schema.py) and how YAML and overrides become them (load.py)."""

from runner.config.load import build, field_docs, load_sweep, sweep_from_dict
from runner.config.schema import (
    PRECISIONS,
    SCORING_FIELDS,
    TRAINING_FIELDS,
    Domain,
    Precision,
    ResourcesConfig,
    SchedulerConfig,
    SweepConfig,
    TrialConfig,
    check_tracking_uri,
)

__all__ = ["PRECISIONS", "SCORING_FIELDS", "TRAINING_FIELDS", "Domain", "Precision", "ResourcesConfig", "SchedulerConfig",
           "SweepConfig", "TrialConfig", "build", "check_tracking_uri", "field_docs", "load_sweep",
           "sweep_from_dict"]
