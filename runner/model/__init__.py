"""The model: where it and the node cache are (paths.py: no torch), BLIP-2 loading, precision and LoRA
(blip2.py), the frozen image path's cache (features.py), the memory preflight (preflight.py)."""
