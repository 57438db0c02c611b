"""Ray Tune + Ray Train sweeps of BLIP-2 LoRA fine-tuning on (medical) VQA, tracked in MLflow."""

__version__ = "0.1.0"
