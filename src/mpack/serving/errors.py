"""The errors a client or an operator can cause, each with its HTTP status and gRPC status code.

`serving/` imports nothing of the rest of mpack (the image stays slim), so it has its own small hierarchy;
``mpack serve`` maps :class:`ServeConfigError` to mpack's ``ConfigError`` (exit 2) in cli.py.
"""

from __future__ import annotations


class ServingError(Exception):
    """Base class: a V2 error answer ``{"error": message}`` with ``http_status`` / ``grpc_code``.

    Args:
        message: One line naming the problem.
        hint: One line naming the fix. Defaults to None.
    """

    http_status = 400
    grpc_code = "INVALID_ARGUMENT"  # a grpc.StatusCode name; grpc is imported only by grpc_api.py

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class InvalidInputError(ServingError):
    """The request is malformed or does not match the model (names, dtypes, shapes, data lengths)."""


class ModelNotFoundError(ServingError):
    http_status = 404
    grpc_code = "NOT_FOUND"


class MethodNotAllowedError(ServingError):
    http_status = 405
    grpc_code = "UNIMPLEMENTED"


class PayloadTooLargeError(ServingError):
    http_status = 413
    grpc_code = "RESOURCE_EXHAUSTED"


class UnavailableError(ServingError):
    """The queue is full, or the server is starting or draining: retry later or elsewhere."""

    http_status = 503
    grpc_code = "UNAVAILABLE"


class ModelRunError(ServingError):
    """ONNX Runtime raised while running the request (e.g. an index out of range). Like Triton, a 400: the input
    is what made this model fail, and the server stays up."""


class NotConfiguredError(ServingError):
    """An endpoint whose feature is off in this server's configuration (the job endpoints without ``--queue``)."""

    http_status = 501
    grpc_code = "UNIMPLEMENTED"


class ForbiddenError(ServingError):
    http_status = 403
    grpc_code = "PERMISSION_DENIED"


class ServeConfigError(Exception):
    """A server option, deployment file or model is invalid; raised before the server starts (exit code 2).

    Args:
        field: The option or deployment-file key, e.g. ``--max-batch-size`` or ``models[0].routing.canary``.
        value: The value given.
        problem: What is wrong with it.
        hint: How to fix it. Defaults to None.
    """

    exit_code = 2

    def __init__(self, field: str, value: object, problem: str, hint: str | None = None) -> None:
        super().__init__(f"{field} {value!r}: {problem}")
        self.field = field
        self.value = value
        self.problem = problem
        self.hint = hint
        self.message = str(self)
