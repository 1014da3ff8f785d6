"""Exceptions callers may want to tell apart (kept light: the CLI imports this without torch)."""


class WeightsNotFoundError(OSError):
    """Model weights asked for are not on disk and cannot be downloaded (e.g. offline)."""
