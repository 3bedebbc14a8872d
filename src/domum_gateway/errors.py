"""One error hierarchy for the whole gateway.

Every error a caller may see derives from :class:`DomumError`. Each class states the
HTTP ``status``, the problem ``type`` slug and a human ``title``; a single middleware
(``control.problems``) turns them into ``application/problem+json`` (RFC 9457) for the
API and into a plain page for users. What is logged is not what is returned: the
``detail`` is written for the person who sees it, never an internal name or trace.

    DomumError (500)
    ├── ConfigError            bad or unknown setting (start-up stops; not HTTP)
    ├── BadRequest (400)       malformed JSON, invalid UTF-8, bad query
    ├── Unauthorized (401)     missing or wrong credentials
    ├── Forbidden (403)        role may not do this
    ├── NotFound (404)
    ├── Conflict (409)         state does not allow the action (forward a revoked request)
    ├── PayloadTooLarge (413)
    ├── ValidationError (422)  field-level ``errors``
    ├── TooManyRequests (429)  carries ``retry_after`` seconds
    ├── DeliveryError (502)    e-mail / SMS provider refused or unreachable
    ├── UpstreamError (502)    target unreachable / bad answer
    ├── UpstreamTimeout (504)
    └── StoreError (503)       the database failed: fail closed
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BadRequest",
    "ConfigError",
    "Conflict",
    "DeliveryError",
    "DomumError",
    "FieldError",
    "Forbidden",
    "NotFound",
    "PayloadTooLarge",
    "StoreError",
    "TooManyRequests",
    "Unauthorized",
    "UpstreamError",
    "UpstreamTimeout",
    "ValidationError",
]


@dataclass(frozen=True, slots=True)
class FieldError:
    """One invalid field: a dotted path (``duration.unit``) and what is wrong with it."""

    field: str
    message: str


class DomumError(Exception):
    """Base of every error the gateway raises on purpose."""

    status: int = 500
    type: str = "internal"
    title: str = "Internal error"

    def __init__(self, detail: str | None = None) -> None:
        self.detail = detail or self.title
        super().__init__(self.detail)


class ConfigError(DomumError):
    type = "config"
    title = "Invalid configuration"


class BadRequest(DomumError):
    status = 400
    type = "bad-request"
    title = "Bad request"


class Unauthorized(DomumError):
    status = 401
    type = "unauthorized"
    title = "Authentication required"


class Forbidden(DomumError):
    status = 403
    type = "forbidden"
    title = "Forbidden"


class NotFound(DomumError):
    status = 404
    type = "not-found"
    title = "Not found"


class Conflict(DomumError):
    status = 409
    type = "conflict"
    title = "Conflict"


class PayloadTooLarge(DomumError):
    status = 413
    type = "payload-too-large"
    title = "Payload too large"


class ValidationError(DomumError):
    status = 422
    type = "validation"
    title = "Validation failed"

    def __init__(self, errors: list[FieldError] | FieldError, detail: str | None = None) -> None:
        self.errors = [errors] if isinstance(errors, FieldError) else list(errors)
        summary = "; ".join(f"{e.field}: {e.message}" for e in self.errors)
        super().__init__(detail or summary or self.title)

    @classmethod
    def one(cls, field: str, message: str) -> ValidationError:
        return cls(FieldError(field, message))


class TooManyRequests(DomumError):
    status = 429
    type = "too-many-requests"
    title = "Too many requests"

    def __init__(self, detail: str | None = None, retry_after: int = 60) -> None:
        self.retry_after = max(1, int(retry_after))
        super().__init__(detail)


class DeliveryError(DomumError):
    status = 502
    type = "delivery-failed"
    title = "Message delivery failed"


class UpstreamError(DomumError):
    status = 502
    type = "upstream-failed"
    title = "Target unreachable"


class UpstreamTimeout(DomumError):
    status = 504
    type = "upstream-timeout"
    title = "Target did not answer in time"


class StoreError(DomumError):
    status = 503
    type = "store-unavailable"
    title = "Storage unavailable"
