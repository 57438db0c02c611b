"""Tracking in MLflow: the client and every tag name (client.py), the Tune callback with its outage
journal (callback.py), fetching checkpoints and adapters (artifacts.py). Driver side only."""
