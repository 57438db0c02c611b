"""Training one trial: the recipe (loop.py) and its checkpoints (checkpoint.py)."""
