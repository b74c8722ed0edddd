"""The one error type checkpoint code raises for problems a user can fix (paths, keys, shapes, files)."""


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed, or does not match its config; the message says what to fix."""
