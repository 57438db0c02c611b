"""What a person reads after a sweep: the trials table (terminal), later markdown and figures."""

from __future__ import annotations

import math

from runner.config import SweepConfig


def trials_table(results, config: SweepConfig) -> str:
    """One line per trial: varied params, best and last validation metric, epochs run, status."""
    keys = list(config.space)
    metric = config.metric
    header = ["trial", *keys, f"best {metric}", "shuffled EM", "epochs", "status"]
    rows = []
    for result in results:
        params = result.config or {}
        history = result.metrics_dataframe
        best = shuffled = math.nan
        epochs = 0
        if history is not None and metric in history:
            ordered = history.sort_values(metric, ascending=config.mode == "min")
            best = float(ordered[metric].iloc[0])
            shuffled = float(ordered.get("val_shuffled_exact_match", [math.nan]).iloc[0])
            epochs = int(history["epoch"].max())
        status = "FAILED" if result.error else ("STOPPED_EARLY" if epochs < config.trial.epochs else "TERMINATED")
        trial_id = (result.metrics or {}).get("trial_id") or result.path.rsplit("_", 1)[-1] if result.path else "?"
        rows.append([str(trial_id), *(format_value(params.get(k)) for k in keys), f"{best:.4f}",
                     f"{shuffled:.4f}", str(epochs), status])
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)) for line in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def format_value(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)
