"""OpenAI-shaped errors (the OpenAI API reference, "Error codes"): every failure answers
`{"error": {"message", "type", "param", "code"}}` with the HTTP status a client library maps to an exception
class (400 BadRequestError, 401 AuthenticationError, 404 NotFoundError, 429 RateLimitError, 500 InternalServerError).
"""

from __future__ import annotations

import re

from fastapi.responses import JSONResponse

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
               405: "invalid_request_error", 422: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @classmethod
    def from_value_error(cls, error: ValueError, param: str | None = None) -> APIError:
        """A 400 from a library ValueError; `name=value ...` messages name their parameter."""
        message = str(error)
        if param is None:
            m = re.match(r"(?:request '[^']*': )?([a-z_]+)=", message)
            param = m.group(1) if m else None
        return cls(400, message, param, "invalid_value" if param else None)


def error_response(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": ERROR_TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}
    return JSONResponse(body, status_code=status)
