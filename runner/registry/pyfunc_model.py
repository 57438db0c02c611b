"""MLflow "model from code" entry: the registered model is rebuilt from this file, not unpickled."""

from mlflow.models import set_model

from runner.registry.pyfunc import Blip2LoraModel

set_model(Blip2LoraModel())
