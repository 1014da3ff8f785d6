"""Exceptions callers may want to tell apart (kept light: the CLI imports this without torch)."""


class WeightsNotFoundError(OSError):
    """Model weights asked for are not on disk and cannot be downloaded (e.g. offline)."""


class GenerationInterrupted(RuntimeError):
    """A `refinement_scope` stop condition ended generation in a pipeline without diffusers'
    interrupt flag (PixArt takes only the legacy ``callback``): there is no image to return.

    Attributes:
        records: the call's records (``skipped: generation interrupted``), already logged.
    """

    def __init__(self, records: list):
        super().__init__("generation stopped by the refinement_scope stop condition")
        self.records = records
