"""What a run prints: progress bars on a terminal, periodic log lines elsewhere, and no warnings it cannot act on.

A tqdm bar redraws itself with carriage returns; in a log file or a CI log those become one huge line or
fragments interleaved with the log records. ``progress`` therefore draws a bar only when stderr is a
terminal, and otherwise logs a line every ``interval`` seconds and one at the end.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from typing import Any, Optional

logger = logging.getLogger(__name__)

#: Seconds between two progress lines when stderr is not a terminal.
LOG_INTERVAL = 30.0


def on_terminal() -> bool:
    """Whether stderr (where bars and logs go) is an interactive terminal.

    Returns:
        ``True`` when a progress bar can redraw in place.

    Example:
        >>> isinstance(on_terminal(), bool)
        True
    """
    return bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())


class LogProgress:
    """A tqdm-like progress counter that logs ``desc: n/total (p%), elapsed, remaining`` now and then.

    It supports what the toolkit uses of tqdm: iteration, ``update``, ``set_postfix`` and ``close``.

    Args:
        iterable: Items to yield while counting (optional; otherwise call ``update``).
        total: Number of steps (default: ``len(iterable)`` when it has one).
        desc: What is being counted, e.g. ``"Training"``.
        initial: Steps already done (a resumed run).
        interval: Least seconds between two lines; the last line is always written.
        unit: The steps' unit in the line, e.g. ``"steps"``.

    Example:
        >>> counter = LogProgress(range(3), desc="Extracting features", unit="batches")
        >>> list(counter)
        [0, 1, 2]
        >>> counter.n
        3
    """

    def __init__(
        self,
        iterable: Optional[Iterable[Any]] = None,
        *,
        total: Optional[int] = None,
        desc: str = "Progress",
        initial: int = 0,
        interval: float = LOG_INTERVAL,
        unit: str = "it",
    ) -> None:
        self.iterable = iterable
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.desc, self.unit, self.interval = desc, unit, interval
        self.n = self._start_n = initial
        self._start = self._last = time.monotonic()
        self._postfix = ""
        self._closed = False

    def __iter__(self) -> Iterator[Any]:
        for item in self.iterable or ():
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        """Count ``n`` more steps; log a line if ``interval`` seconds passed since the last one.

        Args:
            n: Steps done.

        Returns:
            None.

        Example:
            >>> counter = LogProgress(total=10, desc="Training")
            >>> counter.update(4); counter.n
            4
        """
        self.n += n
        if time.monotonic() - self._last >= self.interval:
            self._log()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        """Show ``values`` (e.g. the loss) at the end of the next line.

        Args:
            refresh: Accepted for tqdm compatibility; lines keep their own pace.
            **values: Names and values to show.

        Returns:
            None.

        Example:
            >>> counter = LogProgress(total=10, desc="Training")
            >>> counter.set_postfix(epoch=2, loss="0.4321")
        """
        self._postfix = ", ".join(f"{name}={value}" for name, value in values.items())

    def close(self) -> None:
        """Log the final line (once).

        Returns:
            None.

        Example:
            >>> LogProgress(total=2, desc="Training").close()
        """
        if not self._closed:
            self._closed = True
            self._log()

    def _log(self) -> None:
        self._last = now = time.monotonic()
        elapsed = now - self._start
        parts = [f"{self.n}/{self.total}" if self.total else str(self.n), self.unit]
        line = f"{self.desc}: {' '.join(parts)}"
        if self.total:
            line += f" ({100 * self.n / self.total:.0f}%)"
        line += f", {_duration(elapsed)} elapsed"
        done = self.n - self._start_n
        if self.total and done > 0 and self.n < self.total:
            line += f", ~{_duration(elapsed / done * (self.total - self.n))} left"
        if self._postfix:
            line += f", {self._postfix}"
        logger.info(line)


def progress(
    iterable: Optional[Iterable[Any]] = None,
    *,
    total: Optional[int] = None,
    desc: str = "Progress",
    initial: int = 0,
    enabled: bool = True,
    unit: str = "it",
) -> Any:
    """A tqdm bar on a terminal, a ``LogProgress`` (a line every ``LOG_INTERVAL`` s) anywhere else.

    Args:
        iterable: Items to iterate over while counting (optional).
        total: Number of steps (default: ``len(iterable)``).
        desc: What is counted.
        initial: Steps already done.
        enabled: ``False`` (e.g. on all but the main process) counts silently.
        unit: The steps' unit.

    Returns:
        An object with tqdm's ``update``, ``set_postfix`` and ``close`` that iterates over ``iterable``.

    Example:
        >>> sum(progress(range(4), desc="Summing", enabled=False))
        6
    """
    if enabled and on_terminal():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, initial=initial, unit=unit)
    interval = LOG_INTERVAL if enabled else float("inf")
    counter = LogProgress(iterable, total=total, desc=desc, initial=initial, interval=interval, unit=unit)
    if not enabled:
        counter._closed = True  # nothing to say at the end either
    return counter


@contextlib.contextmanager
def quiet_peft_wrapping() -> Iterator[None]:
    """Silence the one warning that wrapping any transformers 5 model with peft 0.21 prints.

    ``PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, which transformers 5 deprecated
    (``FutureWarning``) in favour of ``is_activation_checkpointing``. Neither the user nor this package
    can act on it; every other warning still shows.

    Returns:
        A context manager; warnings filters are restored on exit.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     with quiet_peft_wrapping():
        ...         warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed", FutureWarning)
        ...         warnings.warn("something else", FutureWarning)
        >>> [str(warning.message) for warning in caught]
        ['something else']
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        yield


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"
