"""What the ``recpost`` command prints, and where: progress on stdout; warnings and errors on stderr, one
line each, so that a failed command's stderr is the cause alone.

Lightning logs through its own handlers (progress, "Seed set to 0", device summaries) and warns through
``warnings``; a few of its messages are noise in every recpost run and are filtered here, each by its
message (never all warnings of a kind).
"""

from __future__ import annotations

import errno
import logging
import sys
import warnings

from recpost.core.errors import RecpostError

# Lightning's messages that say nothing to a recpost user, in every run.
_QUIET_LOG_MESSAGES = ("💡 Tip: For seamless cloud logging",)  # an advertisement for another logger
_QUIET_WARNINGS = (
    # torch 2.13 deprecates a class Lightning 2.6 still checks for on every batch transfer
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning),
    # printed on any machine with SLURM installed; docs/cluster.md says how recpost runs under srun
    (r"The `srun` command is available on your system but is not used", Warning),
)
# validate / test / predict: the checkpoint's callback states point to the fit's folder, by design.
_EVALUATION_WARNINGS = (r"The dirpath has changed from",)
# A fit resumed in its own run folder finds that folder full, by design.
_RESUME_WARNINGS = (r"Experiment logs directory .* exists and is not empty", r"Checkpoint directory .* exists and is not empty")
# OS errors that are about the user's paths (permissions, a file where a folder should be, a full disk).
_PATH_ERRORS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.ENOTDIR, errno.EISDIR, errno.EEXIST,
                errno.ENOENT}


class _BelowWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


class _Quiet(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.getMessage()).startswith(_QUIET_LOG_MESSAGES)


def configure_output() -> None:
    """Info on stdout, warnings and errors on stderr (messages only), Lightning's loggers included."""
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_BelowWarning())
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    root = logging.getLogger()
    for handler in (out, err):
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.addFilter(_Quiet())
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):  # their own handlers print otherwise
        lightning_logger = logging.getLogger(name)
        for handler in list(lightning_logger.handlers):
            lightning_logger.removeHandler(handler)
        lightning_logger.propagate = True
    for message, category in _QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_evaluation_warnings() -> None:
    for message in _EVALUATION_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def quiet_resume_warnings() -> None:
    for message in _RESUME_WARNINGS:
        warnings.filterwarnings("ignore", message=message)


def user_error(exc: BaseException | None) -> str | None:
    """The one line to print for ``exc`` if a user can fix it (a ``RecpostError`` anywhere in its chain,
    a Lightning configuration error, a path that cannot be used), else None (a bug: let it raise)."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    seen = set()
    first = exc
    while exc is not None and id(exc) not in seen:  # jsonargparse wraps errors raised while it instantiates
        if isinstance(exc, RecpostError):
            return str(exc)
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    exc = first
    if isinstance(exc, MisconfigurationException):
        return " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.errno in _PATH_ERRORS and exc.filename:
        return f"{exc.filename}: {exc.strerror}; check the path and its permissions"
    return None
