"""When a command draws progress bars, and how loud it is: the one policy of every `facepq` command.

Progress bars (tqdm, on stderr) are drawn only on a terminal: in a log file each redraw is a
new line and hundreds of them pile up. Logging is quiet by default (WARNING: what went wrong,
then the command's own summary), `-v` adds each phase and its progress as INFO lines (what a
log file of a long run wants), `-vv` debug detail. Servers, whose INFO lines are their
operations log (a new index version, a node joining), log INFO by default.
"""
from __future__ import annotations

import logging
import sys

QUIET, PHASES, DEBUG = logging.WARNING, logging.INFO, logging.DEBUG


def bars_enabled(requested: bool = True, stream=None) -> bool:
    """True when progress bars should be drawn: asked for (no --no-progress) and `stream` (stderr) is a terminal."""
    stream = sys.stderr if stream is None else stream
    try:
        return bool(requested) and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def log_level(verbosity: int, default: int = QUIET) -> int:
    """The root logging level for `-v` given `verbosity` times, starting from a command's `default`."""
    return max(logging.DEBUG, default - 10 * max(0, verbosity))


def is_quiet(logger_name: str = "facepq") -> bool:
    """Whether INFO lines of `logger_name` are hidden: libraries that log on their own (Ray) follow suit."""
    return not logging.getLogger(logger_name).isEnabledFor(logging.INFO)
