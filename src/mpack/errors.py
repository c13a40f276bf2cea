"""One error hierarchy for mpack.

Every error a user can cause is an :class:`MpackError`. The CLI maps it once (in ``cli.py``) to a single red line
on stderr plus a hint, and to the ``exit_code`` below; anything else that escapes is a bug and keeps its traceback.

Exit codes (documented in README.md, N.B. keep both in step):
    0  success
    1  internal error (a bug: please report it)
    2  usage or bad input (a file, an option, a model that cannot be loaded)
    3  parity failure (an output differs beyond tolerance, or has the wrong shape)
    4  a missing optional dependency (the message names the extra to install)
    5  export failure (the exporter could not convert the model)
    6  performance regression (``mpack bench --baseline``: slower than the baseline beyond the bound)
    7  image build failure (``mpack build-image``: no engine, base image, build or smoke test)
    8  image over its size budget (``mpack build-image --max-size``)
    9  queue service unavailable (``mpack worker``: Redis unreachable or lost)
  130  interrupted by SIGINT (``mpack batch``: progress is kept; the same command resumes)
"""

from __future__ import annotations


class MpackError(Exception):
    """Base class of every error a user can act on.

    Args:
        message: One line naming the problem.
        hint: One line naming the fix. Defaults to None.
    """

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message} ({self.hint})"


class ConfigError(MpackError):
    """An option or a config value is invalid."""

    def __init__(self, field: str, value: object, problem: str, hint: str | None = None) -> None:
        super().__init__(f"{field} {value!r}: {problem}", hint)
        self.field = field
        self.value = value


class InputFileError(MpackError):
    """A file given on the command line is missing, unreadable or of the wrong kind."""


class MissingDependencyError(MpackError):
    exit_code = 4


class ExportError(MpackError):
    exit_code = 5


class ParityError(MpackError):
    """Raised after a failed parity check; ``report`` carries the figures for rendering."""

    exit_code = 3

    def __init__(self, message: str, report: object = None, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.report = report


class RegressionError(MpackError):
    """Benchmark rows slower than the baseline; ``result`` carries the figures for rendering."""

    exit_code = 6

    def __init__(self, result: object, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.result = result


class DockerError(MpackError):
    """``mpack build-image``: no engine, a base image that cannot be resolved, a failed build or smoke test.

    ``details`` carries the lines worth showing under the one-line error (the failing build step's output, the
    container's log tail).
    """

    exit_code = 7

    def __init__(self, message: str, hint: str | None = None, details: tuple[str, ...] = ()) -> None:
        super().__init__(message, hint)
        self.details = details


class SizeBudgetError(MpackError):
    """``mpack build-image --max-size``: the image is larger than allowed; ``result`` carries the build."""

    exit_code = 8

    def __init__(self, result: object, message: str, hint: str | None = None) -> None:
        super().__init__(message, hint)
        self.result = result


class QueueServiceError(MpackError):
    """``mpack worker``: Redis cannot be reached (or was lost), or refused the work."""

    exit_code = 9


class JobInterruptedError(MpackError):
    """``mpack batch``: SIGINT stopped the job; committed parts are kept and the same command resumes it."""

    exit_code = 130


def first_line(exc: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message, without ANSI colours, for one-line errors."""
    import re

    text = str(exc).strip() or type(exc).__name__
    return re.sub(r"\x1b\[[0-9;]*m", "", text.splitlines()[0])[:limit]
