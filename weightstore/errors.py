"""The one exception hierarchy of weightstore.

Every error the core raises is a ``WeightstoreError`` with a stable, machine-readable ``code``.
Each leaf also derives from the stdlib exception it is closest to (``ValueError``,
``LookupError``, ``PermissionError``, ...), so callers that know nothing of weightstore still catch
it sensibly. The HTTP layer maps classes to status codes in exactly one table
(``weightstore_api.errors.ERROR_TABLE``); the Python client maps ``code`` back to the class with
``error_for_code``.

Why the status discipline matters: the Tinker SDK retries 408/409/429/5xx for minutes, so a
*permanent* error must never be one of those (except where Tinker documents it: the publish /
unpublish 409, ``Conflict``).
Only ``TransientError`` subclasses are retryable.
"""

from __future__ import annotations

from typing import Any, ClassVar


class WeightstoreError(Exception):
    """Base class. ``code`` is stable across releases; ``message`` is for humans."""

    code: ClassVar[str] = "internal_error"
    retryable: ClassVar[bool] = False
    # Set by the Python client only: the HTTP status of the response that carried the error, and
    # whether a presigned URL's object store could not be reached. Not pickled (``__reduce__``).
    status_code: int | None = None
    unreachable: bool = False

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details = details

    def __reduce__(self) -> tuple[Any, ...]:
        # Picklable with details (worker processes send errors back through queues/rows).
        return (_rebuild, (type(self), self.message, self.details))

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            out["details"] = self.details
        return out


def _rebuild(cls: type[WeightstoreError], message: str, details: dict[str, Any]) -> WeightstoreError:
    return cls(message, **details)


# --- caller mistakes (4xx, permanent) -------------------------------------------------------------


class InvalidRequest(WeightstoreError, ValueError):
    code = "invalid_request"


class InvalidName(InvalidRequest):
    code = "invalid_name"


class InvalidPath(InvalidRequest):
    """A tinker:// path or a file path inside a checkpoint that is malformed or escapes its root."""

    code = "invalid_path"


class InvalidTTL(InvalidRequest):
    code = "invalid_ttl"


class InvalidFormat(InvalidRequest):
    """A file whose contents do not match its declared format (safetensors, adapter config)."""

    code = "invalid_format"


class IntegrityError(InvalidRequest):
    """Bytes that do not match their declared size or sha256."""

    code = "integrity_mismatch"


class UploadIncomplete(InvalidRequest):
    code = "upload_incomplete"


class UploadExpired(InvalidRequest):
    code = "upload_expired"


class Unsupported(InvalidRequest):
    """A Tinker endpoint that exists in the SDK but is out of scope here (training, sampling)."""

    code = "unsupported"


class SessionFinished(InvalidRequest):
    """A heartbeat for a Tinker session that has finished. Answered 410 (Tinker's contract: the
    status that stops the SDK's heartbeat loop)."""

    code = "session_finished"


class AuthenticationFailed(WeightstoreError, PermissionError):
    code = "unauthenticated"


class Forbidden(WeightstoreError, PermissionError):
    """Authenticated but the role does not allow the action (never used to hide existence)."""

    code = "forbidden"


class NotFound(WeightstoreError, LookupError):
    """Missing — or belonging to another tenant: the two are indistinguishable on purpose."""

    code = "not_found"


class AlreadyExists(WeightstoreError, FileExistsError):
    """A name already taken. Mapped to 400 (not 409): it is permanent and the SDK retries 409."""

    code = "already_exists"


class Conflict(WeightstoreError, RuntimeError):
    """A state conflict that Tinker's contract answers with 409: publish a checkpoint that is
    already public, unpublish one that is already private. Nothing else raises it."""

    code = "conflict"


class InUse(WeightstoreError, RuntimeError):
    """Refused because something still references the object (base model used by a job, ...)."""

    code = "in_use"


class QuotaExceeded(InvalidRequest):
    code = "too_large"


class TenantQuotaExceeded(InvalidRequest):
    """An upload would take its tenant's logical bytes past the tenant's hard quota. Permanent (400):
    retrying cannot help until something is deleted or the quota is raised."""

    code = "quota_exceeded"


class RunDeleted(InvalidRequest):
    """Something would be published into a training run that ``runs rm`` deleted (e.g. an upload
    declared before the delete and committed after it). Permanent (400): the run never comes back."""

    code = "run_deleted"


class TenantDisabled(Forbidden):
    """The key is valid but its tenant is disabled by an admin (until ``tenants enable``)."""

    code = "tenant_disabled"


# --- transient (retryable) ------------------------------------------------------------------------


class TransientError(WeightstoreError, ConnectionError):
    code = "unavailable"
    retryable = True


class StoreUnavailable(TransientError):
    """The object store cannot be reached or answered 5xx. Safe to retry; nothing was committed."""

    code = "store_unavailable"


class CatalogBusy(TransientError):
    code = "catalog_busy"


class ServiceUnavailable(TransientError):
    """Raised by the Python client only: no API replica answered within the retry deadline
    (connection refused, reset or timed out, or a load balancer's 502/503/504 without a weightstore
    error), or a call that is not safe to repeat lost its connection after it was sent."""

    code = "service_unavailable"


class CatalogUnavailable(TransientError):
    """The catalog cannot be reached: restarting, refusing connections, out of connection slots, or
    the pool found no free connection in time. Retryable: a restarting PostgreSQL is back in seconds,
    and the engine's pre-ping replaces the pooled connections it closed."""

    code = "catalog_unavailable"


class LeaseLost(TransientError):
    """A worker or collector lost its lease to another process and must stop."""

    code = "lease_lost"


class LeaseHeld(WeightstoreError, RuntimeError):
    """Another process holds the lease (one collector at a time)."""

    code = "lease_held"


class DataLoss(WeightstoreError, RuntimeError):
    """An invariant is broken: a referenced blob is missing or corrupt. Operators must look."""

    code = "data_loss"


class ExportFailed(WeightstoreError, RuntimeError):
    code = "export_failed"


class VerificationFailed(ExportFailed):
    code = "verification_failed"


def _all_subclasses(cls: type[WeightstoreError]) -> list[type[WeightstoreError]]:
    out = [cls]
    for sub in cls.__subclasses__():
        out.extend(_all_subclasses(sub))
    return out


def error_for_code(code: str) -> type[WeightstoreError]:
    """The class for a wire ``code`` (the client uses it to re-raise typed errors)."""
    for cls in _all_subclasses(WeightstoreError):
        if cls.code == code:
            return cls
    return WeightstoreError
