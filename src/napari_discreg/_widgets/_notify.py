"""User-facing messages: every error a user can cause becomes a napari notification.

All widgets report through :func:`error`, :func:`warning` and :func:`info` (never a
traceback dialog); tests capture them by monkeypatching the names below or by
listening to ``napari.utils.notifications.notification_manager``.
"""

from __future__ import annotations

import logging

from napari.utils.notifications import show_error, show_info, show_warning

logger = logging.getLogger("napari_discreg")

#: Exceptions that come from user input (bad layers, files, checkpoints) rather than bugs.
#: Anything else (IndexError, KeyError, TypeError...) is a bug: its traceback is logged
#: and the message says so. Code that can fail on a user's input raises ValueError.
USER_ERRORS = (ValueError, FileNotFoundError, OSError, FloatingPointError)
BUG_NOTE = "this is a bug: please report it (the traceback is in the log)"


def error(message: str) -> None:
    """Show ``message`` as a napari error notification."""
    logger.info("error shown to the user: %s", message)
    show_error(str(message))


def warning(message: str) -> None:
    """Show ``message`` as a napari warning notification."""
    show_warning(str(message))


def info(message: str) -> None:
    """Show ``message`` as a napari info notification."""
    show_info(str(message))


def describe(exc: BaseException) -> str:
    """A one-line message for ``exc``: the text of user errors, the type otherwise."""
    if isinstance(exc, USER_ERRORS):
        return str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {exc}"


def notify_exception(exc: BaseException, context: str = "") -> None:
    """Turn an exception (e.g. from a worker) into an error notification."""
    prefix = f"{context}: " if context else ""
    if isinstance(exc, USER_ERRORS):
        error(prefix + describe(exc))
        return
    logger.error("unexpected error%s", f" in {context}" if context else "", exc_info=exc)
    error(f"{prefix}{describe(exc)} ({BUG_NOTE})")
