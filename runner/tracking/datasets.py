"""A trial's data as MLflow dataset inputs, so the runs table's Dataset column names it: metadata only
(`MetaDataset`: a name, our fingerprint as the digest, where the data comes from), never the images —
`mlflow.data.from_huggingface` would read up to 10,000 rows to hash them.

The descriptions are plain dicts, worked out once on the sweep driver: they travel in the MLflow
callback's journal, which must stay JSON.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

DIGEST_LIMIT = 36  # MLflow refuses a longer dataset digest (mlflow.utils.validation.MAX_DATASET_DIGEST_SIZE)
SPLITS = (("train", "training"), ("validation", "validation"))  # (our split, MLflow's input context)


def data_source(task, data: str | dict | None) -> dict[str, str]:
    """Where a task's data comes from: {"path": local folder or file} or {"hub": id, "revision": rev}.
    A mapping (`{path, columns, ...}`, the generic task) comes from its `path`."""
    module = sys.modules[type(task).__module__]
    if isinstance(data, dict):
        data = data.get("path")
    if data is None:
        if hasattr(module, "HUB_ID"):
            return {"hub": module.HUB_ID, "revision": getattr(module, "HUB_REVISION", "main")}
        return {"path": str(module.package_data())}  # a task whose data ships in a package (easy_vqa)
    path = Path(data).expanduser()
    if path.exists():
        return {"path": str(path.resolve())}
    hub_id, _, revision = data.partition("@")
    return {"hub": hub_id, "revision": revision or getattr(module, "HUB_REVISION", "main")}


def describe(task, data: str | dict | None) -> list[dict[str, str]]:
    """The task's train and validation splits as dataset inputs (the splits are loaded already)."""
    source = data_source(task, data)
    return [{"name": f"{task.name} {split}", "digest": task.load_split(split).fingerprint[:DIGEST_LIMIT],
             "context": context, **source} for split, context in SPLITS]


def dataset_inputs(described: list[dict[str, str]]) -> list:
    """MLflow `DatasetInput`s for `MlflowClient.log_inputs`, from `describe`'s dicts."""
    from mlflow.data.dataset_source_registry import get_dataset_source_from_json
    from mlflow.data.huggingface_dataset_source import HuggingFaceDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    inputs = []
    for item in described:
        split = item["name"].rsplit(" ", 1)[-1]
        if "hub" in item:
            source = HuggingFaceDatasetSource(item["hub"], revision=item["revision"], split=split)
        else:
            source = get_dataset_source_from_json(json.dumps({"uri": item["path"]}), "local")
        dataset = MetaDataset(source, name=item["name"], digest=item["digest"])
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(MLFLOW_DATASET_CONTEXT,
                                                                               item["context"])]))
    return inputs
