"""Scoring: batched greedy generation and the metrics (evaluate.py, metrics.py), held-out test runs (held_out.py)."""
