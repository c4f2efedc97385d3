"""Errors a user can act on, and the one table of what each means to a caller.

Library code raises these (never prints); the CLI turns them into one line on
stderr and a non-zero exit code (`exit_code`), and a service edge into a status
(`status`). A status is the name of a google.rpc canonical code (`INVALID_ARGUMENT`,
`NOT_FOUND`, ...): the gRPC servers answer `grpc.StatusCode[status]`, an HTTP
gateway answers `HTTP_STATUS[status]`. So a new error class chooses its status
here, once, and every transport maps it the same way.
"""


class FacepqError(Exception):
    """Base class: the message is written for a person and says what to do."""

    exit_code = 2
    status = "FAILED_PRECONDITION"


class ConfigError(FacepqError):
    """An invalid option or combination of options (bits, codebooks, paths)."""

    status = "INVALID_ARGUMENT"


class InvalidRequest(ConfigError):
    """A request that cannot be served as sent (no query, a value out of range); the message says what to send."""


class CheckpointError(FacepqError):
    """A checkpoint that is missing, corrupt, or does not match what it claims."""


class DataError(FacepqError):
    """Input data that cannot be used at all (empty gallery, no people, bad list file)."""


class IndexFormatError(FacepqError):
    """An index on disk that is missing, corrupt, or of another model/format."""


class PhotoSkipped(FacepqError):
    """A photo that gives no usable face. `reason` is the short key run summaries count, Enrol reports per
    photo and the ingest job writes in its `skip` column ('no_face', 'truncated', 'not_an_image', ...)."""

    reason = "unusable"


class NoFaceFound(PhotoSkipped):
    """The photo decoded but the face detector found no face in it (for several photos: none gave a usable face)."""

    status = "FAILED_PRECONDITION"
    reason = "no_face"


class BadImage(PhotoSkipped):
    """A file that is not a usable image."""

    status = "INVALID_ARGUMENT"

    def __init__(self, reason: str, detail: str = ""):
        self.reason = reason
        super().__init__(f"{reason}: {detail}" if detail else reason)


class NotFound(FacepqError):
    """What a request names is not there: a person or face ids with no live face, a shard a node does not serve."""

    status = "NOT_FOUND"


class AlreadyEnrolled(FacepqError):
    """A photo (face id) already enrolled as another person: refused, never silently kept under the old name
    (indexer.enrol_rule). The message names the person it is enrolled as."""

    status = "ALREADY_EXISTS"


class AlreadyExists(FacepqError):
    """What a request would create is there already: renaming a person to a name that has faces (merge them)."""

    status = "ALREADY_EXISTS"


class StorageFull(FacepqError):
    """The disk (or quota) holding the index is full: nothing was committed; free space or grow the volume."""

    status = "RESOURCE_EXHAUSTED"


class StorageReadOnly(FacepqError):
    """The index cannot be written here (a read-only file system, or no permission): nothing was committed.
    Reading and serving still work."""


class Misconfigured(FacepqError):
    """A server was given settings that cannot work (e.g. a registry that refuses its credentials); it
    refuses to start rather than run in a state that answers every request wrongly."""


class Overloaded(FacepqError):
    """The server is full (query_node.admission): the request was not started; retry after `retry_after_ms`."""

    status = "RESOURCE_EXHAUSTED"

    def __init__(self, message: str, retry_after_ms: int = 1000):
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


class NotCalibrated(FacepqError):
    """An answer needs the model's score calibration (a false-accept rate, a calibrated similarity) and the model
    has none: run `facepq calibrate`, or give a raw score threshold."""

    status = "FAILED_PRECONDITION"


class Unavailable(FacepqError):
    """Something the request needs is down or busy right now (the index version unreadable, the commit lock held
    too long, a shard NOT_SERVING on this node); the same request can succeed later or elsewhere."""

    status = "UNAVAILABLE"


class VersionConflict(FacepqError):
    """The index moved to new versions faster than one search could gather all shards at one version."""

    status = "ABORTED"


class NodeRefused(FacepqError):
    """A query node refused a request the coordinator built (not a node being down): the two disagree on the
    index or the node token. Nothing the caller sent can fix it, so it is an internal error to them."""

    status = "INTERNAL"


# google.rpc.Code -> HTTP status, as google.rpc's code.proto documents the mapping.
HTTP_STATUS = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "OUT_OF_RANGE": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "ABORTED": 409,
    "ALREADY_EXISTS": 409,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INTERNAL": 500,
    "DATA_LOSS": 500,
    "UNIMPLEMENTED": 501,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
