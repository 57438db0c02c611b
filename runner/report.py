"""What a person reads after a sweep: the terminal table, and a markdown report with PNG figures
regenerated from MLflow alone (no local state), also logged as artifacts of the sweep's run."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from runner.config import SweepConfig, sweep_from_dict
from runner.tracking.client import (
    KIND_TAG,
    PARENT_TAG,
    STAGE_TAG,
    STATUS_TAG,
    TRIAL_TAG,
    Tracker,
)

# Published results, for orientation only (BLEU-1 / F1, %), by the dataset names of the paper's Table 2.
# Our rows are never mixed in; a task that is none of these datasets gets no reference table.
MED_PALM_M = "Tu et al., *Towards Generalist Biomedical AI* (Med-PaLM M), arXiv:2307.14334, Table 2"
BLIP2_VQA_RAD = "the original BLIP-2 VQA-RAD reproduction project (BLIP-2 Flan-T5-XL, LoRA)"
TABLE_2 = {  # model: (VQA-RAD, Slake-VQA, Path-VQA), each (BLEU-1, F1)
    "Prior specialist SOTA": (("71.03", "–"), ("78.60", "78.10"), ("70.30", "58.40")),
    "PaLM-E 84B": (("59.19", "38.67"), ("52.65", "24.53"), ("54.92", "29.68")),
    "Med-PaLM M 12B": (("64.02", "50.66"), ("90.77", "86.22"), ("68.97", "57.24")),
    "Med-PaLM M 84B": (("69.38", "59.90"), ("92.70", "89.28"), ("70.16", "59.51")),
    "Med-PaLM M 562B": (("71.27", "62.06"), ("91.64", "87.50"), ("72.27", "62.69")),
}
BENCHMARKS = ("VQA-RAD", "Slake-VQA", "Path-VQA")
REFERENCE = {
    benchmark: [(model, *scores[i], MED_PALM_M) for model, scores in TABLE_2.items()]
    for i, benchmark in enumerate(BENCHMARKS)
}
REFERENCE["VQA-RAD"] += [
    ("BLIP-2 Flan-T5-XL zero-shot", "0.44*", "0.70", BLIP2_VQA_RAD),
    ("BLIP-2 Flan-T5-XL one-shot", "2.54*", "3.86", BLIP2_VQA_RAD),
    ("BLIP-2 Flan-T5-XL LoRA", "26.16*", "26.16", BLIP2_VQA_RAD),
]
FOOTNOTE = {"VQA-RAD": "\\* The BLIP-2 reproduction's \"BLEU-1\" is clipped unigram precision without the brevity "
                       "penalty; ours (nltk `sentence_bleu`, weights (1,)) includes it, so short answers score lower here."}
STAGE_METRICS = [("bleu1", "BLEU-1"), ("token_f1", "F1"), ("exact_match", "EM"),
                 ("closed_accuracy", "closed acc"), ("open_recall", "open recall"),
                 ("shuffled_exact_match", "shuffled-image EM")]


def trials_table(results, config: SweepConfig) -> str:
    """Terminal table from Tune's results: varied params, best validation metric, epochs, status."""
    keys = list(config.space)
    metric = config.metric
    header = ["trial", *keys, f"best {metric}", "shuffled EM", "epochs", "status"]
    rows = []
    for result in results:
        history = result.metrics_dataframe
        best = shuffled = math.nan
        epochs = 0
        if history is not None and metric in history:
            ordered = history.sort_values(metric, ascending=config.mode == "min")
            best = float(ordered[metric].iloc[0])
            shuffled = float(ordered["val_shuffled_exact_match"].iloc[0])
            epochs = int(history["epoch"].max())
        status = "FAILED" if result.error else ("STOPPED_EARLY" if epochs < config.trial.epochs else "TERMINATED")
        trial_id = (result.metrics or {}).get("trial_id", "?")
        rows.append([trial_id, *(fmt(result.config.get(k)) for k in keys), f"{best:.4f}", f"{shuffled:.4f}",
                     str(epochs), status])
    return text_table(header, rows)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    lines = ["  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)) for line in [header, *rows]]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
                      *("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)])


def fmt(value) -> str:
    if isinstance(value, str):  # MLflow params come back as text
        try:
            value = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            return value
    if isinstance(value, float):
        return "–" if math.isnan(value) else f"{value:.4g}"
    return str(value)


def pct(value: float | None) -> str:
    return "–" if value is None or math.isnan(value) else f"{100 * value:.2f}"


@dataclass
class SweepRecord:
    """Everything the report needs, read from MLflow."""

    parent: object
    trials: list
    stages: dict  # stage name -> run
    histories: dict  # run id -> {metric: [(epoch, value), ...]}


def read_sweep(tracker: Tracker, sweep_run_id: str, metric: str) -> SweepRecord:
    client = tracker.client
    parent = client.get_run(sweep_run_id)
    children = client.search_runs([tracker.experiment_id], f"tags.`{PARENT_TAG}` = '{sweep_run_id}'",
                                  max_results=10_000)
    trials = sorted((r for r in children if r.data.tags.get(KIND_TAG) == "trial"),
                    key=lambda r: r.data.tags.get(TRIAL_TAG, ""))
    stages = {r.data.tags[STAGE_TAG]: r for r in children if r.data.tags.get(KIND_TAG) == "stage"}
    histories = {
        run.info.run_id: {key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
                          for key in (metric, "train_loss")}
        for run in trials}
    return SweepRecord(parent, trials, stages, histories)


def logged_config(tracker: Tracker, sweep_run_id: str) -> SweepConfig:
    """The sweep's settings as its MLflow run recorded them (`search_space.json`)."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory(prefix="runner-report-") as folder:
        path = tracker.client.download_artifacts(sweep_run_id, "search_space.json", folder)
        return sweep_from_dict(json.loads(Path(path).read_text()), f"MLflow run {sweep_run_id}: search_space.json")


def write_report(tracker: Tracker, sweep_run_id: str, out_dir: Path) -> Path:
    """Markdown + PNG figures into out_dir, also logged under the sweep run's `report/` artifacts."""
    out_dir.mkdir(parents=True, exist_ok=True)
    config = logged_config(tracker, sweep_run_id)
    record = read_sweep(tracker, sweep_run_id, config.metric)
    tags = record.parent.data.tags
    metric, keys = config.metric, list(config.space)
    test_metric = "test_" + metric.removeprefix("val_")
    stage_runs = stages_of(record, metric)
    fine_tuned = stage_runs[-1][1]

    trial_rows = [[run.data.tags.get(TRIAL_TAG, run.info.run_id[:8]),
                   *(fmt(run.data.params.get(k, "–")) for k in keys),
                   fmt(run.data.metrics.get(f"best_{metric}", math.nan)),
                   fmt(run.data.metrics.get("val_shuffled_exact_match", math.nan)),
                   str(len(record.histories[run.info.run_id][metric])),
                   run.data.tags.get(STATUS_TAG, run.info.status),
                   fmt(run.data.metrics.get(test_metric, math.nan))]
                  for run in record.trials]
    stage_rows = rows_of_stages(stage_runs)
    n_test = fine_tuned.data.metrics.get("test_n") if fine_tuned else None

    figures = draw_figures(record, config, stage_runs, out_dir)
    lines = [
        f"# Sweep `{tags.get('mlflow.runName', config.name)}`",
        "",
        f"Task **{tags.get('runner.task')}**, base model **{tags.get('runner.base_model')}** "
        f"({tags.get('runner.precision')}); MLflow sweep run `{sweep_run_id}`; code `{tags.get('runner.code_version')}`.",
        "",
        f"## Trials (validation split; best epoch by `{metric}`)",
        "",
        markdown_table(["trial", *keys, f"best {metric}", "shuffled-image EM (last epoch)", "epochs", "status",
                        test_metric], trial_rows),
        "",
        f"## Stages on the test split ({fmt(n_test)} questions, the same for every stage; %)",
        "",
        f"Our rows: task `{tags.get('runner.task')}`, model `{tags.get('runner.base_model')}`.",
        "",
        markdown_table(["stage", *(label for _, label in STAGE_METRICS)], stage_rows),
        "",
        *reference_section(config),
        "## Figures",
        "",
        *(f"![{name}]({path.name})" for name, path in figures.items()),
        "",
    ]
    report = out_dir / "report.md"
    report.write_text("\n".join(lines))
    tracker.client.log_artifacts(sweep_run_id, str(out_dir), "report")
    return report


def reference_section(config: SweepConfig) -> list[str]:
    """The published table for the swept dataset, or a plain sentence that there is none."""
    from runner.errors import UserError
    from tasks import TASKS, get_task

    trial = config.trial
    benchmark = getattr(TASKS.get(trial.task), "benchmark", None)
    try:
        task = get_task(trial.task, data=trial.data)
        data = task.describe() if hasattr(task, "describe") else f"task `{trial.task}`"
    except UserError:
        data = f"task `{trial.task}`"
    if benchmark is None:
        known = ", ".join(BENCHMARKS)
        return ["## Published results", "",
                f"None shown: the swept data ({data}) is none of the datasets of the Med-PaLM M paper's "
                f"Table 2 ({known}), so no published number is comparable with ours.", ""]
    return [f"## Published {benchmark} results (reference only: the Med-PaLM M paper's Table 2, %)", "",
            f"Our data: {data}. The published rows are on each dataset's full test split.", "",
            markdown_table(["model", "BLEU-1", "F1", "source"], [list(row) for row in REFERENCE[benchmark]]), "",
            *([FOOTNOTE[benchmark], ""] if benchmark in FOOTNOTE else [])]


def log_ticks(ax) -> None:
    """A log axis labelled 1e-4, 2e-4, 5e-4 ... (matplotlib's own labels vanish within one decade)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    def label(value: float, _position) -> str:
        exponent = math.floor(math.log10(value) + 1e-9)
        return f"{round(value / 10 ** exponent, 2):g}e{exponent}"

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(label))
    ax.xaxis.set_minor_formatter(NullFormatter())


def stages_of(record: SweepRecord, metric: str) -> list[tuple[str, object]]:
    """(stage, run or None) in order: zero-shot, one-shot, then the fine-tuned best trial (best on test)."""
    test_metric = "test_" + metric.removeprefix("val_")
    fine_tuned = max((r for r in record.trials if test_metric in r.data.metrics),
                     key=lambda r: r.data.metrics[test_metric], default=None)
    return [*((name, record.stages.get(name)) for name in ("zero-shot", "one-shot")),
            ("fine-tuned (best trial)", fine_tuned)]


def rows_of_stages(stage_runs: list[tuple[str, object]]) -> list[list[str]]:
    return [[name, *(pct(run.data.metrics.get(f"test_{key}")) if run else "–" for key, _ in STAGE_METRICS)]
            for name, run in stage_runs]


def stage_table(tracker: Tracker, sweep_run_id: str) -> str:
    """The stage comparison for the terminal (test split, %), from MLflow."""
    config = logged_config(tracker, sweep_run_id)
    stage_runs = stages_of(read_sweep(tracker, sweep_run_id, config.metric), config.metric)
    return text_table(["stage (test, %)", *(label for _, label in STAGE_METRICS)], rows_of_stages(stage_runs))


def axis_value(param: str) -> float | str:
    """A logged parameter as a plot coordinate: a number, or a category (LoRA targets such as `q,v`)."""
    try:
        return float(param)
    except ValueError:
        return param


def draw_figures(record: SweepRecord, config: SweepConfig, stage_runs, out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    metric, keys = config.metric, list(config.space)
    figures = {}

    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        points = [(axis_value(run.data.params[key]), run.data.metrics.get(f"best_{metric}", math.nan))
                  for run in record.trials if key in run.data.params]
        ax.scatter([p[0] for p in points], [p[1] for p in points], color="tab:blue")
        if key == "learning_rate":
            log_ticks(ax)
        elif all(isinstance(p[0], float) and p[0] == int(p[0]) for p in points):  # rank, sample count: no 4.5
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(key)
        ax.set_ylabel(f"best {metric}")
        ax.grid(alpha=0.3)
    fig.suptitle("best validation metric per trial")
    figures["metric vs parameters"] = save(fig, out_dir / "params.png")

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for run in record.trials:
        label = run.data.tags.get(TRIAL_TAG, run.info.run_id[:8])
        for ax, key in ((left, metric), (right, "train_loss")):
            steps = record.histories[run.info.run_id][key]
            ax.plot([s for s, _ in steps], [v for _, v in steps], marker="o", label=label)
    left.set(xlabel="epoch", ylabel=metric, title="validation")
    right.set(xlabel="epoch", ylabel="train loss", title="training")
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epoch 1, 2, not 1.25
    left.legend(fontsize=7)
    figures["learning curves"] = save(fig, out_dir / "curves.png")

    names = [name for name, _ in stage_runs]
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(STAGE_METRICS)
    for i, (key, label) in enumerate(STAGE_METRICS):
        values = [100 * (run.data.metrics.get(f"test_{key}", math.nan) if run else math.nan) for _, run in stage_runs]
        ax.bar([x + i * width for x in range(len(names))], values, width, label=label)
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(names))], names)
    ax.set(ylabel="% (test)", title="stage progression")
    ax.legend(fontsize=7, ncol=3)
    figures["stage progression"] = save(fig, out_dir / "stages.png")

    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (key, label) in enumerate((("closed_accuracy", "closed: accuracy"), ("open_recall", "open: recall"))):
        values = [100 * (run.data.metrics.get(f"test_{key}", math.nan) if run else math.nan) for _, run in stage_runs]
        ax.bar([x + i * 0.4 for x in range(len(names))], values, 0.4, label=label)
    ax.set_xticks([x + 0.2 for x in range(len(names))], names)
    ax.set(ylabel="% (test)", title="closed vs open questions")
    ax.legend(fontsize=8)
    figures["closed vs open"] = save(fig, out_dir / "closed_open.png")
    return figures


def save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path
