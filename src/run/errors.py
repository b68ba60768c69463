"""User-facing errors: one clear line naming the problem and the fix, never a bare traceback."""

import errno
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

from hydra.errors import CompactHydraException, MissingConfigException

FULL_ERROR = "HYDRA_FULL_ERROR"
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT}
WRITE_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR}


class UserError(Exception):
    """A mistake the user can fix; its message names the problem and the fix."""


def find_user_error(err: BaseException) -> UserError | None:
    """`err` itself or the UserError it was raised from (Hydra's `instantiate` wraps errors)."""
    while err is not None:
        if isinstance(err, UserError):
            return err
        err = err.__cause__
    return None


def hydra_message(err: CompactHydraException) -> str:
    """One line for a Hydra config error: an unknown option lists the valid ones."""
    if isinstance(err, MissingConfigException) and err.options and err.missing_cfg_file:
        group, _, name = err.missing_cfg_file.rpartition("/")
        return f"unknown {group} {name!r}. Fix: {group}=one of {', '.join(err.options)}"
    text = str(err).split("Config search path:")[0]
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def os_message(err: OSError) -> str | None:
    """One line for a full disk or a place that cannot be written; None for other OS errors."""
    where = f" ({err.filename})" if err.filename else ""
    if err.errno in DISK_ERRORS:
        return (
            f"disk full: {err.strerror}{where}. Fix: free space, or write elsewhere with "
            "hydra.run.dir=... and cache_dir=...; checkpoints already written are intact"
        )
    if err.errno in WRITE_ERRORS:
        return (
            f"cannot write: {err.strerror}{where}. Fix: make it writable, or write elsewhere "
            "with hydra.run.dir=..."
        )
    return None


def user_message(err: Exception) -> str | None:
    """The one-line message for an error the user can fix, None for anything else (a bug)."""
    if found := find_user_error(err):
        return str(found)
    if isinstance(err, CompactHydraException):
        return hydra_message(err)
    if isinstance(err, OSError):
        return os_message(err)
    return None


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Print a user's mistake as one `error: ...` line and exit with status 2.

    Put it outside `@hydra.main` so that it also sees Hydra's own config errors (an unknown
    option, a bad override): it sets `HYDRA_FULL_ERROR=1` for the call so that Hydra raises
    them instead of printing them. When the user sets `HYDRA_FULL_ERROR=1`, every error is
    re-raised with its traceback, for debugging. Ctrl-C outside training exits with 130.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        users = os.environ.get(FULL_ERROR)
        full = users == "1"
        os.environ[FULL_ERROR] = "1"
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            if full:
                raise
            print("interrupted", file=sys.stderr)
            sys.exit(130)
        except Exception as err:
            message = user_message(err)
            if full or message is None:
                raise
            print(f"error: {message}", file=sys.stderr)
            sys.exit(2)
        finally:
            if users is None:
                os.environ.pop(FULL_ERROR, None)
            else:
                os.environ[FULL_ERROR] = users

    return wrapper
