"""The errors a bad request raises, carrying OpenAI's error body and HTTP status.

Knows: the error envelope `{"error": {"message", "type", "param", "code"}}` (SEMANTICS 9).
Does not know: which rules exist (params.py) or how HTTP is served.

`create()` raises only `CompletionError` subclasses for bad input:

    >>> try:
    ...     create(model="gpt2", prompt="x", temperature=3)
    ... except CompletionError as e:
    ...     e.status, e.to_dict()["error"]["param"]
    (400, 'temperature')

Divergence: OpenAI often sends `param: null` for legacy validation errors; we always
name the offending field when there is one.
"""

from __future__ import annotations


class CompletionError(Exception):
    """A request OpenAI would answer with an error body; `status` is the HTTP status."""

    status = 500
    type = "server_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"error": {"message": self.message, "type": self.type,
                          "param": self.param, "code": self.code}}

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, param={self.param!r}, code={self.code!r})"


class InvalidRequestError(CompletionError):
    """400: the request breaks a rule of SEMANTICS 9 (types, ranges, combinations)."""

    status = 400
    type = "invalid_request_error"


class ModelNotFoundError(CompletionError):
    """404 `model_not_found`: no loadable model has this name."""

    status = 404
    type = "invalid_request_error"

    def __init__(self, model: str):
        super().__init__(f"The model `{_clip(model)}` does not exist or you do not have access "
                         "to it.", param="model", code="model_not_found")


class ModelLoadError(CompletionError):
    """500 `model_load_failed`: the model exists but its files could not be loaded.

    Our choice (OpenAI has no such case): a server-side fault, so 500 `server_error`, not
    404. The message names the model only, never a filesystem path; the exception's
    `__cause__` (CheckpointError, TokenizerFileError, OSError...) keeps the detail for logs.
    """

    status = 500
    type = "server_error"

    def __init__(self, model: str):
        super().__init__(f"The model `{_clip(model)}` could not be loaded: its files on the "
                         "server are damaged or unreadable.", param="model",
                         code="model_load_failed")


def _clip(text: str, limit: int = 200) -> str:
    """A name from a request, cut so that it cannot make a message huge."""
    return text if len(text) <= limit else text[:limit] + "..."
