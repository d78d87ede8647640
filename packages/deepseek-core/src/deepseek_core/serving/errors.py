"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

# OpenAI's error `type` for each status code the server returns.
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class OpenAIError(Exception):
    """An error the server answers with `status_code` and an OpenAI-shaped body."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        """The JSON body: {"error": {...}}."""
        return error_body(self.status_code, self.message, param=self.param, code=self.code)

    def response(self) -> JSONResponse:
        """A JSONResponse carrying this error."""
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def error_body(
    status_code: int, message: str, *, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """The OpenAI error object for `status_code`."""
    return {
        "error": {
            "message": message,
            "type": _ERROR_TYPES.get(
                status_code, "server_error" if status_code >= 500 else "invalid_request_error"
            ),
            "param": param,
            "code": code,
        }
    }


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> OpenAIError:
    """A 400 naming the parameter at fault."""
    return OpenAIError(400, message, param=param, code=code)


def validation_error_to_openai(errors: list[dict[str, Any]]) -> OpenAIError:
    """Turn pydantic/FastAPI validation errors into one 400 naming the first offending parameter."""
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body",)]
    param = ".".join(loc) if loc else None
    msg = str(first.get("msg", "invalid value"))
    if first.get("type") == "json_invalid":
        return bad_request(f"request body is not valid JSON: {msg}", None, "invalid_json")
    message = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return bad_request(message, param)
