"""Attention: the spec of who sees whom (spec.py), the kernels (backends.py), KV caches
(cache.py) and the ``attention`` mixer kind (layer.py)."""
