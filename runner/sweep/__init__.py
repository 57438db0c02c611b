"""The sweep: Ray Tune over the search space (tuner.py), each trial a Ray Train worker (trial.py), and the
driver's own state files (state.py)."""
