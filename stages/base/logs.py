"""The one logging configuration of ``fruits-pipeline`` (called by the CLI's ``main``).

Every module reports through ``logging.getLogger(__name__)``; a library never
configures logging, so only an application (the CLI, a notebook) calls
:func:`configure_logging`.  It sends:

- to the console (stderr), the message alone, as the progress lines always looked (a
  record's traceback only with ``--debug``): INFO and above by default, WARNING and
  above with ``--quiet``, DEBUG with ``-v``; other libraries (botocore, TensorFlow)
  only their warnings and py4j nothing, unless ``-vv``;
- to the run's log file (the one that receives Spark's log and failures' traces),
  every record of the project at DEBUG, with time, level and logger name.
"""

from __future__ import annotations

import logging
import sys
from typing import Optional

__all__ = ["configure_logging", "console_level", "console_shows", "PROJECT_LOGGERS"]

# The top-level packages whose records are ours (their levels are set here; others
# keep the root's).
PROJECT_LOGGERS = ("stages", "cluster", "linalg")

FILE_FORMAT = "%(asctime)s,%(msecs)03d %(levelname)s %(name)s: %(message)s"
FILE_DATE_FORMAT = "%Y-%m-%dT%H:%M:%S"  # as the ISO8601 of Spark's lines in the same file


class _ConsoleHandler(logging.StreamHandler):
    """A handler on ``sys.stderr`` (or ``sys.stdout``) as it is at each record.

    Bound at each emit, not at creation: pytest's capture, a notebook kernel or Livy
    replace ``sys.stderr`` after the configuration is made.
    """

    def __init__(self, stream_name: str = "stderr") -> None:
        super().__init__(getattr(sys, stream_name))
        self._stream_name = stream_name

    @property  # type: ignore[override]
    def stream(self):
        return getattr(sys, self._stream_name)

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it
        pass


class _OthersWarnOnly(logging.Filter):
    """Other libraries' records from WARNING up only, even from a logger a library set
    to INFO itself (the root's level alone would let those through)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or _is_ours(record.name)


class _NoPy4j(logging.Filter):
    """py4j's records stay off the console below ``-vv``: a failure it logs (with the
    Python trace of a ``foreachBatch`` call) also reaches us as an exception, which the
    CLI turns into its one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.name.startswith("py4j")


class _MessageOnly(logging.Formatter):
    """The message alone: a record's traceback goes to the log file, and to the console
    only with ``--debug``."""

    def format(self, record: logging.LogRecord) -> str:
        return record.getMessage()


def _is_ours(name: str) -> bool:
    return name.split(".", 1)[0] in PROJECT_LOGGERS


# The handlers installed by the last call, removed by the next one.
_installed: list = []


def console_shows(level: int) -> bool:
    """Whether the console installed by :func:`configure_logging` shows records of
    ``level`` (True when none is installed: a library use, its own handlers decide).

    The project's loggers are at DEBUG whenever a log file is written, so their level
    does not say what ``--quiet`` hides; the console handler's does.
    """
    consoles = [h for h in _installed if isinstance(h, _ConsoleHandler)]
    return not consoles or any(h.level <= level for h in consoles)


def console_level(verbosity: int, debug: bool = False) -> int:
    """The console's level: -1 (``--quiet``) WARNING, 0 INFO, 1+ (``-v``) DEBUG.

    ``--debug`` (full traces) also shows the DEBUG lines, unless ``--quiet``.
    """
    if debug and verbosity == 0:
        verbosity = 1
    if verbosity < 0:
        return logging.WARNING
    return logging.INFO if verbosity == 0 else logging.DEBUG


def configure_logging(
    verbosity: int = 0,
    log_file: Optional[str] = None,
    debug: bool = False,
    stream: str = "stderr",
) -> None:
    """Route the project's log records to the console and the run's log file.

    Calling it again replaces what the previous call installed (the tests call the
    CLI's ``main`` many times in one process): handlers are never duplicated.

    Parameters
    ----------
    verbosity : int
        -1 for ``--quiet`` (warnings and errors only), 0 for the progress lines, 1 for
        ``-v`` (also DEBUG detail), 2 for ``-vv`` (also other libraries' DEBUG).
    log_file : str, optional
        Appended with every record of the project at DEBUG (and, at ``-vv``, of the
        other libraries), with timestamps and logger names.
    debug : bool
        ``--debug``: as ``-v`` unless ``verbosity`` is -1.
    stream : {"stderr", "stdout"}
        The console stream (a notebook may prefer its cell's stdout).
    """
    root = logging.getLogger()
    for handler in _installed:
        root.removeHandler(handler)
        handler.close()
    _installed.clear()

    console = _ConsoleHandler(stream)
    console.setLevel(console_level(verbosity, debug))
    console.setFormatter(logging.Formatter("%(message)s") if debug else _MessageOnly())
    if verbosity < 2:
        console.addFilter(_NoPy4j())
    _installed.append(console)
    if log_file:
        try:
            to_file = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        except OSError:
            to_file = None  # an unwritable log folder must not stop the run
        if to_file is not None:
            to_file.setLevel(logging.DEBUG)
            to_file.setFormatter(logging.Formatter(FILE_FORMAT, FILE_DATE_FORMAT))
            _installed.append(to_file)
    for handler in _installed:
        if verbosity < 2:
            handler.addFilter(_OthersWarnOnly())
        root.addHandler(handler)
    # Ours reach the handlers at DEBUG (each handler filters); other libraries pass the
    # root's level: WARNING, or DEBUG at -vv (py4j and botocore are chatty there).
    for name in PROJECT_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    root.setLevel(logging.DEBUG if verbosity >= 2 else logging.WARNING)
