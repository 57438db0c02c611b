"""The MLflow Model Registry side: guarded promotion (promote.py), the stage comparison (stages.py) and
the registered pyfunc model (pyfunc.py, loaded from code by pyfunc_model.py)."""
