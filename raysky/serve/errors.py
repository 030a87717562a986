"""The errors of the HTTP layer: what a client did wrong (:class:`ApiError`), what the model
cannot take right now (:class:`ServiceUnavailable`), and a body past its limit; and their one
JSON shape (:class:`Error`), which the OpenAPI document declares for every error status each
route answers (:func:`error_responses`), so generated clients can parse every error alike."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# Every route can answer these: the body-limit middleware answers 400 (a Content-Length that
# is not a number) and 413 (one over the limit) before routing, and a bug in raysky is a 500.
COMMON_ERRORS: tuple[int, ...] = (400, 413, 500)
ERROR_DESCRIPTIONS: dict[int, str] = {
    400: "Malformed request: an invalid Content-Length, a malformed multipart body, more form "
         "parts than the form has, or an image file that cannot be decoded.",
    401: "Missing or invalid API key (send 'Authorization: Bearer <key>').",
    413: "The body exceeds the server's limit, or the image has more pixels than it decodes.",
    415: "Not a multipart/form-data body, or an image type or mode the model cannot take "
         "(bilevel, 16-bit, float, several frames, not an image).",
    422: "A field is missing, unknown, repeated or invalid (`field` names it), or a query "
         "parameter has the wrong type.",
    500: "A bug in raysky; `request_id` identifies it in the server's logs.",
    503: "The model is at capacity, restarting or not yet ready; retry after `Retry-After` "
         "seconds.",
}
_ERROR_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    503: {"Retry-After": {"description": "seconds to wait before retrying",
                          "schema": {"type": "integer"}}},
}


class Error(BaseModel):
    """The JSON body of every error answer, whatever its status."""

    model_config = ConfigDict(extra="forbid")  # the document says exactly what is sent

    error: str = Field(description="machine-readable code, e.g. unauthorized, invalid_metadata, "
                       "unsupported_image, body_too_large, unavailable, internal_error")
    detail: str = Field(description="what was wrong, for people")
    field: str | None = Field(None, description="the form field or query parameter at fault, "
                              "when the error is about one (absent otherwise)")
    request_id: str | None = Field(description="the request's id, also in the x-request-id "
                                   "header and the access log")


def error_body(code: str, detail: str, field: str | None, request_id: str | None
               ) -> dict[str, Any]:
    """An :class:`Error` as the JSON object sent: ``field`` only when there is one."""
    return Error(error=code, detail=detail, field=field, request_id=request_id).model_dump(
        exclude=None if field else {"field"})


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAPI ``responses`` of a route that answers ``statuses`` besides
    :data:`COMMON_ERRORS`: each with the :class:`Error` schema, its meaning and its headers.

    Declaring 422 here also replaces FastAPI's own ``HTTPValidationError``, which is not the
    shape raysky answers with.
    """
    return {status: {"model": Error, "description": ERROR_DESCRIPTIONS[status],
                     **({"headers": _ERROR_HEADERS[status]} if status in _ERROR_HEADERS else {})}
            for status in sorted({*COMMON_ERRORS, *statuses})}


class ServiceUnavailable(Exception):
    """The model cannot take the request now (queue full, replica restarting); retry later."""

    def __init__(self, detail: str, retry_after_s: int = 1):
        super().__init__(detail)
        self.detail = detail
        self.retry_after_s = retry_after_s


class ApiError(Exception):
    """A client mistake, answered with ``status`` and a JSON body naming what was wrong."""

    def __init__(self, status: int, code: str, detail: str, field: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(detail)
        self.status, self.code, self.detail, self.field = status, code, detail, field
        self.headers = headers


class BodyTooLarge(Exception):
    """Raised while the body is being read, once it has grown past the limit."""
