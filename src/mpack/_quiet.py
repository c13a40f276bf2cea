"""Silence framework chatter around export calls, in one place.

Exporters talk on every channel: Python warnings, logging, ``print``, and C++ code writing straight to file
descriptors 1 and 2 (the TorchScript exporter's graph dumps, TFLite's XNNPACK line). On stdout that would corrupt
``--json`` output, so all of it goes to a scratch file while an export runs. ERROR records of the named loggers are
collected, not printed: tf2onnx names unsupported ops there.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@contextlib.contextmanager
def silenced(*logger_names: str) -> Iterator[list[logging.LogRecord]]:
    """Run a block with warnings, the named loggers, Python stdout/stderr and fds 1/2 all silenced.

    Yields:
        The list that collects ERROR records of the named loggers.
    """
    handler = _Records()
    loggers = [logging.getLogger(name) for name in logger_names]
    saved = [(lg, lg.level, lg.propagate) for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
        lg.propagate = False
        lg.addHandler(handler)
    try:
        with warnings.catch_warnings(), _fds_to_scratch(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield handler.records
    finally:
        for lg, level, propagate in saved:
            lg.removeHandler(handler)
            lg.setLevel(level)
            lg.propagate = propagate


@contextlib.contextmanager
def _fds_to_scratch() -> Iterator[None]:
    try:
        fds = [(fd, os.dup(fd)) for fd in (1, 2)]
    except OSError:  # no real descriptors (an embedded interpreter): nothing to redirect
        yield
        return
    with tempfile.TemporaryFile() as scratch:
        _flush()
        for fd, _ in fds:
            os.dup2(scratch.fileno(), fd)
        try:
            yield
        finally:
            _flush()
            for fd, copy in fds:
                os.dup2(copy, fd)
                os.close(copy)


def _flush() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
