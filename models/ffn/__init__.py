"""FFN kinds usable by every family: ``swiglu`` (swiglu.py)."""
