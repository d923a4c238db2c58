"""Error types that the ``pretrain`` command reports as one ``error: ...`` line. Kept free of
heavy imports so that ``pretrain data ...`` starts without loading torch."""


class CheckpointError(Exception):
    """A checkpoint is missing, incomplete, or does not fit what is asked of it."""


class ReportError(ValueError):
    """A run directory without metrics to report."""


class TrainingError(RuntimeError):
    """Training cannot continue (e.g. too many consecutive non-finite steps): exit status 3."""
