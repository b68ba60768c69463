"""User-facing errors: one clear line naming the problem and the fix, never a bare traceback."""

import functools
import os
import sys
from collections.abc import Callable
from typing import Any


class UserError(Exception):
    """A mistake the user can fix; its message names the problem and the fix."""


def exit_on_user_error(main: Callable[..., Any]) -> Callable[..., Any]:
    """Print a UserError as one `error: ...` line and exit with status 2.

    `HYDRA_FULL_ERROR=1` re-raises it with its traceback, for debugging.
    """

    @functools.wraps(main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except UserError as err:
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            print(f"error: {err}", file=sys.stderr)
            sys.exit(2)

    return wrapper
