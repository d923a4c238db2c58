"""The ``retention`` mixer kind: gated retention (YOCO's self-decoder), models/retention/layer.py."""

from models.retention.layer import GatedRetention, RetentionConfig, RetentionState

__all__ = ["GatedRetention", "RetentionConfig", "RetentionState"]
