"""The registered model: an MLflow pyfunc whose one artifact is the trial's checkpoint folder (the PEFT
adapter, the processor and the resolved trial config: runner/train/checkpoint.py).

The base model is named (hub id or local path + revision + precision), not copied: BLIP-2 is 4 B
parameters and `mlflow.transformers` would save all of it per version (mlflow issue 22020).
`mlflow.pyfunc.load_model("models:/<name>@champion").predict(df)` takes a DataFrame with columns
`image` (a path or bytes) and `question`, and returns one answer per row.
"""

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow.pyfunc
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types.schema import AnyType, ColSpec, Schema

# What predict takes and returns; `image` is a path or the encoded bytes, hence any type.
SIGNATURE = ModelSignature(inputs=Schema([ColSpec(AnyType(), "image"), ColSpec("string", "question")]),
                           outputs=Schema([ColSpec("string")]))


def pip_requirements() -> list[str]:
    """The packages a loader needs, at the versions this process runs (no slow inference by MLflow)."""
    names = ["torch", "transformers", "peft", "mlflow", "pillow", "blip2-lora-runner"]
    pinned = []
    for name in names:
        try:
            pinned.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            pinned.append(name)
    return pinned


class Blip2LoraModel(mlflow.pyfunc.PythonModel):
    """BLIP-2 + LoRA adapter answering questions about images."""

    def load_context(self, context) -> None:
        from peft import PeftModel
        from transformers import Blip2Processor

        from runner.model.blip2 import (
            check_image_tokens,
            compute_dtype,
            load_blip2,
            resolve_device,
        )
        from runner.tracking.artifacts import CHECKPOINT_ARTIFACT
        from runner.train import checkpoint
        from tasks import get_task

        saved = checkpoint.load(Path(context.artifacts[CHECKPOINT_ARTIFACT]))
        self.trial = saved.config
        self.device = resolve_device(self.trial.device)
        self.dtype = compute_dtype(self.trial.precision, self.device)
        model, _ = load_blip2(self.trial.model, self.trial.precision, self.device, self.trial.model_revision)
        self.processor = Blip2Processor.from_pretrained(saved.processor)
        check_image_tokens(model, self.processor, self.trial.model)
        PeftModel.from_pretrained(model, saved.adapter)
        self.model = model.eval()
        self.task = get_task(self.trial.task, data=self.trial.data)

    # The DataFrame hint (a real object: MLflow reads hints unevaluated, so no `from __future__ import
    # annotations` here) says what predict takes; MLflow infers no schema from it and, unlike for an
    # unannotated predict, does not warn at import.
    def predict(self, context, model_input: pd.DataFrame, params=None) -> list[str]:
        from runner.eval.evaluate import generate
        from runner.model.features import compute_image_features
        from tasks.base import Example, decode_image, image_key

        images, examples = {}, []
        for row, (image, question) in enumerate(zip(model_input["image"], model_input["question"])):
            picture = decode_image(image, f"input row {row}")
            key = image_key(picture)
            images[key] = picture
            examples.append(Example(image_key=key, question=str(question), answer=""))
        features = compute_image_features(self.model, self.processor, images, self.device, self.dtype,
                                          self.trial.eval_batch_size)
        return generate(self.model, self.processor, self.task, examples, [ex.image_key for ex in examples],
                        features, batch_size=self.trial.eval_batch_size,
                        max_new_tokens=self.trial.max_new_tokens)
