"""The errors of the HTTP layer: what a client did wrong (:class:`ApiError`), what the model
cannot take right now (:class:`ServiceUnavailable`), and a body past its limit."""

from __future__ import annotations


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
