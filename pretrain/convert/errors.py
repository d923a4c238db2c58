"""The one error type of conversion: a user error (bad input, existing output, mismatch),
printed by ``pretrain`` as one ``error: ...`` line."""

from __future__ import annotations

from pretrain.errors import CheckpointError


class ConversionError(CheckpointError):
    pass
