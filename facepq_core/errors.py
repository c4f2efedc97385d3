"""Errors a user can act on.

Library code raises these (never prints); the CLI turns them into one line on
stderr and a non-zero exit code, and the gRPC servicers into a status code.
"""


class FacepqError(Exception):
    """Base class: the message is written for a person and says what to do."""

    exit_code = 2


class ConfigError(FacepqError):
    """An invalid option or combination of options (bits, codebooks, paths)."""


class CheckpointError(FacepqError):
    """A checkpoint that is missing, corrupt, or does not match what it claims."""


class DataError(FacepqError):
    """Input data that cannot be used at all (empty gallery, no people, bad list file)."""


class IndexFormatError(FacepqError):
    """An index on disk that is missing, corrupt, or of another model/format."""


class NoFaceFound(FacepqError):
    """The photo decoded but the face detector found no face in it."""


class BadImage(FacepqError):
    """A file that is not a usable image. `reason` is a short key counted in run summaries."""

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
