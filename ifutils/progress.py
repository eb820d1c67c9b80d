"""Progress bars that also reach a log: one plain :class:`tqdm.tqdm` per stage, written to ``sys.stdout``.

In a terminal a bar updates in place (carriage returns). Where nobody watches a terminal -- a notebook kernel
run by ``papermill --log-output`` (which forwards the kernel's stdout lines to its log, as ``scripts/main.sh``
does), or stdout redirected to a file -- carriage-return updates and ``tqdm.auto``'s notebook widgets never reach
the log. There :class:`LogBar` prints whole, newline-terminated lines instead, rate limited per bar:

- nothing for a bar that finishes within ``interval`` seconds (inner loops that run thousands of times stay
  silent);
- after that, at most one line every ``interval`` seconds, at the first finished iteration after it;
- one final line when the bar closes (count, elapsed time, overall rate), if it printed anything before.

Each line is tqdm's meter, e.g. ``epoch 1/5:  40%|####      | 40/100 [00:20<00:30,  2.00batch/s, loss=5.123]``:
description, done/total, elapsed < estimated time left, rate. A single iteration longer than ``interval``
cannot print within itself; the stages with such iterations run inner bars of their own.

Environment:
    IFUTILS_PROGRESS: ``lines`` (log lines always), ``bar`` (in-place bar always) or ``auto`` (default: lines
        when stdout is not a terminal or an IPython kernel is running).
    IFUTILS_PROGRESS_INTERVAL: seconds between log lines of one bar (default 15; 0 prints every iteration).
"""

from __future__ import annotations

import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterable

from tqdm import tqdm

__all__ = ["DEFAULT_INTERVAL", "LogBar", "log", "log_lines", "progress", "stage"]

DEFAULT_INTERVAL = 15.0
MODES = ("auto", "lines", "bar")


def log_lines(stream=None) -> bool:
    """Whether progress goes out as log lines (True) or as an in-place terminal bar (False).

    ``IFUTILS_PROGRESS`` decides when set to ``lines`` or ``bar``; under ``auto`` (the default) lines are used
    when an IPython kernel is running (``ipykernel`` imported: papermill, Jupyter) or ``stream`` (default
    ``sys.stdout``) is not a terminal.

    Raises:
        ValueError: ``IFUTILS_PROGRESS`` is set to something else than ``auto``, ``lines`` or ``bar``.
    """
    mode = os.environ.get("IFUTILS_PROGRESS", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"IFUTILS_PROGRESS={mode!r} is not one of {MODES}; unset it or pick one of those")
    if mode != "auto":
        return mode == "lines"
    stream = sys.stdout if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    return "ipykernel" in sys.modules or not (callable(isatty) and isatty())


def _interval() -> float:
    """Seconds between the log lines of one bar, from ``IFUTILS_PROGRESS_INTERVAL`` (default 15)."""
    raw = os.environ.get("IFUTILS_PROGRESS_INTERVAL", "")
    if not raw.strip():
        return DEFAULT_INTERVAL
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise ValueError(f"IFUTILS_PROGRESS_INTERVAL={raw!r} must be a number of seconds >= 0, e.g. 15")
    return value


class _Discard:
    """A file that swallows tqdm's carriage-return writes; :class:`LogBar` prints its own lines."""

    def write(self, s: str) -> int:
        return len(s)

    def flush(self) -> None:
        pass


class LogBar(tqdm):
    """A :class:`tqdm.tqdm` that prints rate-limited, newline-terminated lines to ``stream`` (see the module).

    Args:
        *args, **kwargs: as for :class:`tqdm.tqdm` (iterable, total, desc, unit, leave, disable, ...); ``file``,
            ``mininterval``, ``miniters``, ``delay`` and ``ascii`` are set here.
        interval: seconds (>= 0) between two lines of this bar, and before its first one.
        stream: where the lines go (default ``sys.stdout`` at each write, so a redirection is followed).
        clock: seconds since any fixed origin, default :func:`time.time` (tqdm's own clock); tests pass a fake one.
    Raises:
        ValueError: ``interval < 0``.
    """

    def __init__(self, *args, interval: float = DEFAULT_INTERVAL, stream=None,
                 clock: Callable[[], float] | None = None, **kwargs):
        if not interval >= 0:
            raise ValueError(f"interval must be >= 0 seconds, got {interval}")
        self._stream, self._interval, self._last_line, self._last_emit = stream, interval, None, None
        kwargs.update(file=_Discard(), mininterval=interval, miniters=1, delay=interval, ascii=True)
        super().__init__(*args, **kwargs)
        if clock is not None:  # tqdm read its clock once already: restart both times on the given one
            self._time = clock
            self.start_t = self.last_print_t = clock()

    def display(self, msg=None, pos=None):
        """Print the meter as one line, at most once per ``interval`` (also for ``set_postfix``/``refresh``
        calls); tqdm's clearing of a closing bar (``msg=''``) prints the final state, if a line came before."""
        final = msg == "" or self.disable  # close(): leave=False clears with '', leave=True displays after disable
        if final:
            if self._last_emit is None:
                return False
            self._ema_dt = lambda: None  # the final line gives the overall rate, not the recent one
        elif self._interval > 0:
            now, start = self._time(), getattr(self, "start_t", None)
            if start is None or now - start < self._interval or (
                    self._last_emit is not None and now - self._last_emit < self._interval):
                return False
        line = self.__str__() if final or msg is None else msg
        if line != self._last_line:
            stream = sys.stdout if self._stream is None else self._stream
            stream.write(line + "\n")
            stream.flush()
            self._last_line = line
        self._last_emit = self._time()
        return True

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs):
        """As :meth:`tqdm.tqdm.set_postfix`, but never refreshes: inside a loop tqdm would show a stale count;
        the next rate-limited line carries the new postfix."""
        super().set_postfix(ordered_dict, refresh=False, **kwargs)

    def set_postfix_str(self, s="", refresh=True):
        """As :meth:`tqdm.tqdm.set_postfix_str`, never refreshing (see :meth:`set_postfix`)."""
        super().set_postfix_str(s, refresh=False)

    def set_description(self, desc=None, refresh=True):
        """As :meth:`tqdm.tqdm.set_description`, never refreshing (see :meth:`set_postfix`)."""
        super().set_description(desc, refresh=False)

    def close(self):
        """Close the bar; its final line is printed only if it printed before (a short bar stays silent)."""
        if not getattr(self, "disable", True) and self._last_emit is not None:  # tqdm skips bars it thinks never displayed
            self.last_print_t = max(self.last_print_t, self.start_t + self.delay)
        super().close()


def progress(iterable: Iterable | None = None, total: float | None = None, desc: str | None = None,
             unit: str = "it", leave: bool = True, disable: bool = False, **kwargs) -> tqdm:
    """A progress bar for one stage: a :class:`LogBar` where output goes to a log, else a terminal bar on stdout.

    Args:
        iterable: what to iterate (optional with ``total`` and manual ``update``).
        total: number of expected iterations (default ``len(iterable)`` when it has one).
        desc: stage name shown first on every line, e.g. ``"epoch 2/5"``.
        unit: what one iteration is (``"batch"``, ``"chunk"``, ``"B"``...), shown in the rate.
        leave: keep the finished bar on the terminal (log lines are always kept).
        disable: no bar at all (a plain pass through ``iterable``).
        **kwargs: other :class:`tqdm.tqdm` arguments (``postfix``, ``unit_scale``...).
    Returns:
        The bar; iterate it, or ``update``/``set_postfix``/``close`` it (or use it as a context manager).
    Raises:
        ValueError: bad ``IFUTILS_PROGRESS`` or ``IFUTILS_PROGRESS_INTERVAL`` (the message says what to set).
    """
    if disable:
        return tqdm(iterable, total=total, desc=desc, unit=unit, disable=True, **kwargs)
    if log_lines():
        return LogBar(iterable, total=total, desc=desc, unit=unit, leave=leave, interval=_interval(), **kwargs)
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=sys.stdout, mininterval=0.5,
                dynamic_ncols=True, **kwargs)


def log(message: str) -> None:
    """Print one line to stdout without breaking a terminal bar that is being drawn (:meth:`tqdm.tqdm.write`)."""
    tqdm.write(message, file=sys.stdout)
    sys.stdout.flush()


@contextmanager
def stage(name: str):
    """Log ``name ...`` when a stage starts and ``name done in 12.3 s`` when it ends (or ``failed after``)."""
    start = time.perf_counter()
    log(f"[stage] {name} ...")
    try:
        yield
    except BaseException:
        log(f"[stage] {name} failed after {time.perf_counter() - start:.1f} s")
        raise
    log(f"[stage] {name} done in {time.perf_counter() - start:.1f} s")
