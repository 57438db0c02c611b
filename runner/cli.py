"""The `runner` command line: train one trial, evaluate, sweep, promote, report.

Every user mistake surfaces as one line on stderr and exit code 2 (click's own usage errors too).
"""

from __future__ import annotations

import json
import os
import sys
import time
import types
import typing
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_origin

import click

from runner import console, pipeline
from runner.config import TrialConfig, build, field_docs
from runner.errors import Interrupted, ServiceError, UserError

ALIASES = {"learning_rate": ["--lr"]}  # short forms people type


class RunnerGroup(click.Group):
    """Turns UserError into one clear line and exit code 2, wherever it is raised."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (UserError, ServiceError, Interrupted) as error:
            click.echo(f"error: {error}", err=True)
            ctx.exit(error.exit_code)


@click.group(cls=RunnerGroup)
@click.option("-v", "--verbose", is_flag=True,
              help="Show everything: debug logging, Ray's and Tune's own output, every library's messages "
                   "(default: our lines and the warnings and errors; the sweep's full log is always in its folder).")
def main(verbose: bool) -> None:
    """Sweep BLIP-2 LoRA fine-tuning on (medical) VQA with Ray Tune, tracked in MLflow."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # air-gapped users: no phoning home
    # Our MLflow callback queues failed writes and retries them at the next event: no need for the
    # client's own minutes-long retry loop to stall the sweep driver during an outage.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    console.setup(verbose)


def trial_options(command):
    """One `--option` per TrialConfig field, typed from its annotation, helped by its docstring."""
    docs = field_docs(TrialConfig)
    hints = typing.get_type_hints(TrialConfig)
    for spec in reversed(fields(TrialConfig)):
        annotation = hints[spec.name]
        flag = "--" + spec.name.replace("_", "-")
        optional = get_origin(annotation) in (typing.Union, types.UnionType)
        inner = [a for a in get_args(annotation) if a is not type(None)] if optional else [annotation]
        base = inner[0] if len(inner) == 1 else str
        if get_origin(base) is typing.Literal:
            kind: Any = click.Choice(get_args(base))
        else:
            kind = {int: int, float: float, bool: bool, str: str}.get(base, str)
        names = [flag, *ALIASES.get(spec.name, [])]
        if kind is bool:
            names = [f"{flag}/--no-{flag[2:]}"]
        help_text = f"{docs.get(spec.name, '')} [default: {spec.default}]"
        command = click.option(*names, spec.name, type=kind, default=None, help=help_text)(command)
    return command


def gpu_memory(metrics: dict[str, float]) -> str:
    peaks = [f"{key.removeprefix('gpu_peak_gib_')} {value:.2f}" for key, value in metrics.items()
             if key.startswith("gpu_peak_gib_")]
    return f" | peak GiB: {', '.join(peaks)}" if peaks else ""


def given(values: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in values.items() if value is not None}


@main.command()
@trial_options
@click.option("--output", type=click.Path(path_type=Path), default=None,
              help="Where checkpoints go [default: runs/train-<time>].")
@click.option("--resume", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="An epoch checkpoint directory of this same trial to continue from.")
def train(output: Path | None, resume: Path | None, **options: Any) -> None:
    """Train one trial (no Ray) and print per-epoch validation metrics."""
    from runner.train.loop import train_trial

    config = build(TrialConfig, given(options), "command line")
    output = output or Path("runs") / time.strftime("train-%Y%m%d-%H%M%S")

    def show(metrics: dict[str, float], checkpoint: Path) -> None:
        click.echo(
            f"epoch {int(metrics['epoch'])}: loss {metrics['train_loss']:.4f} | val exact match "
            f"{metrics['val_exact_match']:.3f} (shuffled images {metrics['val_shuffled_exact_match']:.3f}, "
            f"majority answer {metrics['val_majority_exact_match']:.3f}) | closed acc "
            f"{metrics['val_closed_accuracy']:.3f} | open recall {metrics['val_open_recall']:.3f} | "
            f"BLEU-1 {metrics['val_bleu1']:.3f} | F1 {metrics['val_token_f1']:.3f} | "
            f"{metrics['train_samples_per_second']:.1f} samples/s{gpu_memory(metrics)} -> {checkpoint}"
        )

    history = train_trial(config, output, report=show, resume_from=resume)
    best = max(history, key=lambda m: m["val_exact_match"])
    click.echo(f"best epoch {int(best['epoch'])}: val exact match {best['val_exact_match']:.3f}; "
               f"checkpoints in {output}")


@main.command("eval")
@trial_options
@click.option("--adapter", default=None,
              help="A checkpoint (epoch-NNN) or adapter directory, `runs:/<trial run id>` or "
                   "`models:/<name>@champion`; omit to score the bare model.")
@click.option("--tracking-uri", default=None,
              help="MLflow for runs:/ and models:/ adapters [default: sqlite in ./mlruns].")
@click.option("--stage", type=click.Choice(["zero-shot", "one-shot", "adapter"]), default=None,
              help="zero-shot: the bare model; one-shot: the bare model with a train exemplar in the prompt; "
                   "adapter: --adapter's fine-tuned model [default: adapter if --adapter, else zero-shot].")
@click.option("--split", type=click.Choice(["validation", "test"]), default="validation", show_default=True)
@click.option("--predictions", type=click.Path(path_type=Path), default=None,
              help="Write per-question predictions here (.jsonl or .csv).")
def evaluate_command(adapter: str | None, tracking_uri: str | None, stage: str | None, split: str,
                     predictions: Path | None, **options: Any) -> None:
    """Score an adapter (or the bare model) on a split; print metrics, save per-question predictions."""
    from runner.eval.evaluate import write_predictions

    stage = stage or ("adapter" if adapter else "zero-shot")
    if (stage == "adapter") != (adapter is not None):
        raise UserError("--stage adapter needs --adapter, and only it takes one")
    result = pipeline.evaluate(adapter, tracking_uri, given(options), split, one_shot=stage == "one-shot")
    if predictions is not None:
        write_predictions(result.rows, predictions)
        click.echo(f"predictions: {predictions}")
    click.echo(json.dumps(result.scores, indent=2))


COSTS = """\b
What the shipped spaces cost (trials; time, and where it was measured):
  quickstart.yaml  4 trials, 2 at a time, tiny model on CPU: 2 min 44 s on this project's
                   2-core machine (2026-12-03; 3 min 50 s one at a time, back to back)
  t4.yaml          4 trials x 3 epochs x 500-1,000 questions, BLIP-2 XL int8: not timed on a
                   T4; an H200 capped at 15 GiB trains 13.5 questions/s, so about 4 min per
                   trial there (load + training, validation not counted); a T4 is slower
  vqa_rad.yaml     24 trials x 5 epochs x 400-1,600 questions: not timed; about 4 min per
                   trial on an H200 (24.5 questions/s int8), 24 trials over the local GPUs
  cluster.yaml     8 trials x 4 epochs x 800-1,600 questions: not timed; about 4 min per
                   trial per H200-class GPU, trials spread over the cluster's GPUs
"""


@main.command(epilog=COSTS)
@click.argument("space", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--address", default=None, help="Join an existing Ray cluster (`auto`, or host:port); "
              "default: start a local one.")
@click.option("--resume", is_flag=True, help="Continue the sweep of this name from its saved state.")
@click.option("--no-promote", is_flag=True, help="Skip the test-split evaluation and promotion at the end.")
def tune(space: Path, overrides: tuple[str, ...], address: str | None, resume: bool, no_promote: bool) -> None:
    """Run the sweep in SPACE (a search_spaces/*.yaml); OVERRIDES are key=value or trial.key=value."""
    from runner.config import load_sweep

    config = load_sweep(space, list(overrides))
    command = " ".join(["runner", "tune", str(space), *overrides] + (["--resume"] if resume else []))
    pipeline.tune(config, address=address, resume=resume, command=command,
                  promote=config.promote and not no_promote, say=click.echo)


@main.command()
@click.argument("space", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
@click.option("--address", default=None, help="The Ray cluster whose GPU workers score the test split "
              "(`auto`, or host:port); default: a local one when the trials use GPUs.")
def promote(space: Path, overrides: tuple[str, ...], address: str | None) -> None:
    """Promote the best trial of the sweep in SPACE, compare stages, write the report (safe to run again)."""
    from runner.config import load_sweep

    pipeline.after_sweep(load_sweep(space, list(overrides)), address=address, say=click.echo)


@main.command()
@click.argument("space", type=click.Path(path_type=Path))
@click.argument("overrides", nargs=-1)
def sync(space: Path, overrides: tuple[str, ...]) -> None:
    """Write MLflow updates that a tracking outage left queued for the sweep in SPACE."""
    from runner.config import load_sweep

    pipeline.sync(load_sweep(space, list(overrides)), say=click.echo)


@main.command()
@click.argument("sweep")
@click.argument("overrides", nargs=-1)
@click.option("--tracking-uri", default=None,
              help="MLflow tracking URI [default: the SPACE file's, else sqlite in ./mlruns].")
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for report.md and the figures [default: runs/reports/<sweep name>].")
def report(sweep: str, overrides: tuple[str, ...], tracking_uri: str | None, out: Path | None) -> None:
    """Write the markdown report and figures of SWEEP — a sweep name, its MLflow run id, or its SPACE.yaml
    (with OVERRIDES) — from MLflow alone; they are also logged to the sweep's run."""
    from runner.config import load_sweep

    if sweep.endswith((".yaml", ".yml")):
        config = load_sweep(Path(sweep), list(overrides))
        sweep, tracking_uri = config.name, tracking_uri or config.tracking_uri
    elif overrides:
        raise UserError(f"overrides {' '.join(overrides)!r}: only a SPACE.yaml takes key=value overrides")
    pipeline.report(sweep, tracking_uri, out, say=click.echo)


@main.command()
@click.argument("name")
@click.option("--to", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="A folder to download into (then pass it as trial.data or trial.model) [default: the HF cache, "
                   "which HF_HUB_OFFLINE=1 runs read].")
@click.option("--revision", default=None, help="A branch, tag or commit [default: the task's pinned revision, or main].")
@click.option("--from", "mirror", type=click.Path(path_type=Path, exists=True, file_okay=False), default=None,
              help="Copy from a folder in the hub's layout instead of the hub (a disk carried into the air gap).")
def fetch(name: str, to: Path | None, revision: str | None, mirror: Path | None) -> None:
    """Fetch NAME — a task's dataset (vqa_rad, slake, path_vqa) or a model hub id — for a cluster without
    internet, at one commit, with every file's sha256 recorded in FETCHED.json."""
    from runner.fetch import fetch as fetch_files

    folder, record = fetch_files(name, to=to, revision=revision, mirror=mirror)
    click.echo(f"{record['repo_type']} {record['repo_id']} ({record['commit']}): {len(record['sha256'])} files in "
               f"{folder}; checksums in FETCHED.json")
    use = f"trial.data={folder}" if record["repo_type"] == "dataset" else f"trial.model={folder}"
    click.echo(f"offline: HF_HUB_OFFLINE=1 runner tune SPACE.yaml{'' if to is None else ' ' + use}")


@main.command()
@click.argument("space", required=False)
@click.argument("overrides", nargs=-1)
@click.option("--tracking-uri", default=None,
              help="The MLflow store or server [default: SPACE's, else sqlite in ./mlruns].")
@click.option("--port", type=int, default=pipeline.UI_PORT, show_default=True, help="Port on 127.0.0.1.")
def ui(space: str | None, overrides: tuple[str, ...], tracking_uri: str | None, port: int) -> None:
    """Start `mlflow ui` on 127.0.0.1 over the store of SPACE (with OVERRIDES) or --tracking-uri, and print
    links that open the sweep's trials (SPACE's sweep, else the newest one); Ctrl-C stops it. For a tracking
    server, only print the links into its own UI."""
    from runner.config import load_sweep

    sweep = None
    if space is not None:
        config = load_sweep(Path(space), list(overrides))
        sweep, tracking_uri = config.name, tracking_uri or config.tracking_uri
    elif overrides:
        raise UserError(f"overrides {' '.join(overrides)!r}: only a SPACE.yaml takes key=value overrides")
    sys.exit(pipeline.ui(tracking_uri, sweep, port, say=click.echo))


if __name__ == "__main__":
    sys.exit(main())
