"""What a user-caused failure looks like, and the one place that tells it from a bug.

An exception deriving from :class:`UserError` has a message that is the whole story for a user
(which file, which key, what to do); the CLI prints it as one ``error:`` line without a
traceback. :func:`describe_failure` extends that to the failure classes a user can cause without
the project having anticipated the exact spot (a file that vanished or cannot be read, a port in
use, a GPU out of memory); anything else is a bug in the project and keeps its traceback.

No imports beyond the standard library at module level: cheap to import and to catch anywhere.
"""

from __future__ import annotations

import errno


class UserError(Exception):
    """Mixin for errors whose message is enough for the user to act on."""


class ConfigError(UserError, ValueError):
    """A params file or option that cannot be used; the message says which and why."""


def user_errors() -> tuple[type[Exception], ...]:
    """Every exception class whose message is meant for the user: :class:`UserError` and the storage
    layer's own base (``cache`` imports nothing from the library, so it cannot derive from this one)."""
    from cache.format import CacheError

    return (UserError, CacheError)


_OS_HINTS = {
    errno.ENOENT: "check the path (relative paths are resolved from the current directory)",
    errno.EACCES: "check the file's permissions",
    errno.EPERM: "check the file's permissions",
    errno.EISDIR: "a file was expected here, not a folder",
    errno.ENOTDIR: "a folder in this path is a file",
    errno.ENOSPC: "free some disk space and rerun (finished work is kept)",
    errno.EROFS: "the file system is read-only: choose another output folder",
    errno.EADDRINUSE: "another process listens there: choose another --port or stop it",
    errno.EADDRNOTAVAIL: "this machine has no such address: check --host",
}


def describe_failure(exc: BaseException) -> str | None:
    """The one-line message for a failure the user can act on, or ``None`` for a bug."""
    if isinstance(exc, user_errors()):
        return str(exc)
    if isinstance(exc, MemoryError):
        return "out of memory: lower --batch-size (or --workers), or use a machine with more memory"
    if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError, without importing torch
        return "out of GPU memory: lower --batch-size, or turn on --amp / gradient checkpointing where offered"
    if isinstance(exc, OSError) and exc.errno in _OS_HINTS:
        where = exc.filename if exc.filename is not None else ""
        what = exc.strerror or str(exc)
        return f"{where}: {what}; {_OS_HINTS[exc.errno]}" if where else f"{what}; {_OS_HINTS[exc.errno]}"
    return None


BUG_REPORT = ("this is a bug in the pipeline, not in your input: please report it with the traceback above "
              "and the command line")
