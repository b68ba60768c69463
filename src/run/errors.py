"""User-facing errors: one clear line naming the problem and the fix, never a bare traceback."""

import errno
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException, MissingConfigException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

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


def error_line(err: BaseException) -> str:
    """One line for an error: a UserError's message, else `Type: first line of the message`."""
    err = find_user_error(err) or err
    lines = str(err).strip().splitlines()
    first = lines[0] if lines else ""
    if isinstance(err, UserError):
        return first
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def record_failure(
    main: Callable[[DictConfig], float],
) -> Callable[[DictConfig], float | None]:
    """In a multirun, turn a job's exception into a `failed` result.json and no objective.

    Hydra's sweepers re-raise a failed job's exception once its batch ends, which skips the
    callbacks that summarise the sweep, and an `exit_on_user_error` exit would end the sweep
    at once. So here the error is logged (with its traceback unless it is a UserError) and
    recorded in the job's dir, the job returns None (Optuna marks that trial failed; a NaN
    would crash its sweeper), the other jobs run and the summary lists the failure. A single
    run raises as usual.
    """

    @functools.wraps(main)
    def wrapper(cfg: DictConfig) -> float | None:
        if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
            return main(cfg)
        start = time.perf_counter()
        try:
            return main(cfg)
        except Exception as err:
            log.error("job failed: %s", error_line(err), exc_info=find_user_error(err) is None)
            target = str(OmegaConf.select(cfg, "optimizer._target_", default="") or "")
            result = {
                "backbone": OmegaConf.select(cfg, "backbone.name", default=None),
                "freeze": OmegaConf.select(cfg, "freeze", default=None),
                "optimizer": target.rsplit(".", 1)[-1] or None,
                "lr": OmegaConf.select(cfg, "optimizer.lr", default=None),
                "wall_s": time.perf_counter() - start,
                "status": "failed",
                "error": error_line(err),
            }
            out = Path(HydraConfig.get().runtime.output_dir)
            (out / "result.json").write_text(json.dumps(result, indent=2, default=str))
            return None

    return wrapper
