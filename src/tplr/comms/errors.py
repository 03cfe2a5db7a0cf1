"""Typed storage errors. Stores raise these; nothing returns ``None`` for a failure."""

from __future__ import annotations

from tplr.errors import TplrError


class StoreError(TplrError):
    """A storage operation failed. ``location`` is e.g. ``s3://bucket/key``."""

    retryable: bool = False

    def __init__(self, message: str, *, location: str = "", hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.location = location


class NotFound(StoreError):
    """The bucket or key does not exist."""

    hint = "check the bucket name, the key/prefix and the endpoint"


class AccessDenied(StoreError):
    """The credentials were refused (wrong key, wrong secret, no permission)."""

    hint = "check the access key id and secret for this bucket, and that the key may read/write it"


class InvalidRequest(StoreError):
    """The request was malformed (HTTP 400 and friends); retrying will not help."""


class Throttled(StoreError):
    """The server asked us to slow down (HTTP 429 / 503 SlowDown)."""

    retryable = True
    hint = "lower the request rate (the *_REQUESTS_PER_SECOND setting) or the worker count"


class TransientError(StoreError):
    """A failure that may succeed on retry: 5xx, timeout, reset, short read."""

    retryable = True


class MalformedResponse(StoreError):
    """The endpoint answered something that is not a valid answer (a field missing, of the
    wrong type or out of range, unparsable XML, a listing that goes backwards). Another
    node's endpoint is hostile by assumption: this only ever fails that node's transfer."""

    hint = "the endpoint is not S3-compatible or is misbehaving; check its URL"


class PreconditionFailed(StoreError):
    """The object changed between HEAD and GET (``If-Match`` failed)."""

    retryable = True
    hint = "the object was replaced during the transfer; it will be restarted"


class AlreadyExists(StoreError):
    """``put_if_absent`` found the key already there (not retryable: someone else won)."""


class IntegrityError(StoreError):
    """Downloaded bytes do not match the expected size or hashes."""

    hint = "the object or its manifest is corrupt; re-upload it or regenerate the manifest"


class InsufficientSpace(StoreError):
    """Not enough free disk space for a transfer."""

    def __init__(self, path: str, needed_bytes: int, free_bytes: int, *, hint: str | None = None):
        super().__init__(
            f"not enough disk space at {path}: need {needed_bytes} bytes, {free_bytes} bytes free",
            location=path,
            hint=hint or "free disk space or point the destination at a larger disk",
        )
        self.path = path
        self.needed_bytes = needed_bytes
        self.free_bytes = free_bytes
