"""What a run prints: progress bars on a terminal, periodic log lines elsewhere, no warnings it cannot act on.

A tqdm bar redraws itself with carriage returns, which in a log file or CI log become one huge line or
fragments among the records; ``progress`` therefore draws a bar only when stderr is a terminal.
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
    """Whether stderr (where bars and logs go) is an interactive terminal."""
    return bool(getattr(sys.stderr, "isatty", None) and sys.stderr.isatty())


class LogProgress:
    """A tqdm-like counter that logs ``desc: n/total (p%), elapsed, remaining`` at most every ``interval`` seconds.

    Supports what the toolkit uses of tqdm: iteration, ``update``, ``set_postfix`` and ``close`` (which always
    writes the last line). ``initial`` counts steps a resumed run already did.
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
        """Count ``n`` more steps; log a line if ``interval`` seconds passed since the last."""
        self.n += n
        if time.monotonic() - self._last >= self.interval:
            self._log()

    def set_postfix(self, refresh: bool = False, **values: Any) -> None:
        """Show ``values`` (e.g. the loss) at the end of the next line; ``refresh`` is for tqdm compatibility."""
        self._postfix = ", ".join(f"{name}={value}" for name, value in values.items())

    def close(self) -> None:
        """Log the final line (once)."""
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

    ``enabled=False`` (all but the main process) counts silently.

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
    """Silence the one warning that wrapping any transformers 5 model with peft prints; every other still shows.

    ``PeftModel.__init__`` reads ``model.is_gradient_checkpointing``, which transformers 5 deprecated
    (``FutureWarning``); neither the user nor this package can act on it. Filters are restored on exit.
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
