"""One exception type for every problem a user can fix, so the CLI prints it without a traceback."""


class ThetaError(Exception):
    """A user-facing error: the message names the file, the tensor and the fix."""
