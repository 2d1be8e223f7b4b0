"""What ``mcwt`` tells apart when a command fails: the user's mistake, or a bug of its own.

A :class:`UsageError` is raised only where user input is checked: a flag's value or a combination
of flags, a file or folder the user named (its content included), a run directory that belongs
to another run. ``cli.main`` prints it as one ``mcwt <cmd>: error: ...`` line (exit status 2).
Any other exception is a bug: one line saying so, the traceback in a file (:func:`report_bug`,
exit status 1), so an internal ValueError is never taken for bad input.

UsageError is a ValueError, so the Python API's documented ``ValueError`` stays true; a check
that only guards the package's own invariants raises a plain ValueError (or RuntimeError).
"""
from __future__ import annotations

import os
import shlex
import sys
import tempfile
import traceback

from ._version import __version__

__all__ = ["UsageError", "MissingFileError", "report_bug"]


class UsageError(ValueError):
    """Bad input from the user, said in one line that names the flag or the file."""


class MissingFileError(FileNotFoundError, UsageError):
    """A file the user's input needs is absent (e.g. CIFAR-10's batches under --data-root): a
    usage error that stays a FileNotFoundError for the API's callers that catch that."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _write_traceback(error: BaseException, argv: list[str]) -> str | None:
    """The path of a new file holding the command line and ``error``'s traceback; None if no
    file can be written (then the caller prints the traceback)."""
    text = (f"mcwt {shlex.join(argv)}\nmcwt_ext {__version__}, Python {sys.version.split()[0]}\n\n"
            + "".join(traceback.format_exception(type(error), error, error.__traceback__)))
    try:
        fd, path = tempfile.mkstemp(prefix=f"mcwt-{argv[0] if argv else 'error'}-", suffix=".traceback.txt")
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError:
        sys.stderr.write(text)
        return None
    return path


def report_bug(command: str, error: BaseException, argv: list[str]) -> int:
    """Say on stderr, in one line, that ``error`` (raised by ``mcwt command``) is a bug, with
    where its traceback went; the exit status of a bug, 1.

    The traceback goes to a file in the temporary folder, not to --out: a stray file there would
    make a fresh run directory look like "files but no config.json" and refuse the retry."""
    path = _write_traceback(error, argv)
    where = f"the traceback in {path}" if path else "the traceback above"
    print(f"mcwt {command}: internal error (a bug in mcwt; please report it with {where}): "
          f"{type(error).__name__}: {_one_line(str(error))}", file=sys.stderr)
    return 1
