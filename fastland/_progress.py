"""Progress bars that suit both a terminal and a log file.

:func:`progress_bar` is the one progress helper of fastland's command-line layer:

* **Interactive** (stderr is a terminal, or a Jupyter kernel): a tqdm bar that
  redraws at most :data:`TTY_INTERVAL_S` apart; :meth:`set_postfix` never forces
  a redraw of its own (the next throttled update shows it). tqdm is an optional
  dependency (``fastland[progress]``); without it the log bar below is used.
* **A log** (stderr redirected to a file, a pipe, CI): no per-update output at
  all. One start line, then a line at most every :data:`LOG_INTERVAL_S` seconds
  while the bar runs, and one end line with the count, the time and the last
  postfix — a 200-epoch training log grows by a few hundred bytes per epoch.
* **Off** (``enabled=False``): a bar that does nothing.

Every bar has ``update(n)``, ``set_postfix(**values)``, ``close()`` and works as
a context manager.
"""
from __future__ import annotations

import sys
import time
from typing import Any, Dict, Optional, TextIO

__all__ = ["progress_bar", "TTY_INTERVAL_S", "LOG_INTERVAL_S"]

TTY_INTERVAL_S = 0.5  # at most two redraws a second on a terminal
LOG_INTERVAL_S = 60.0  # at most one line a minute in a log, between the start and end lines


class _NoBar:
    """Stands in for a bar when progress is off."""

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units (ignored)."""

    def set_postfix(self, **values: Any) -> None:
        """Record values to show beside the bar (ignored)."""

    def close(self) -> None:
        """End the bar (nothing to do)."""

    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _format_postfix(values: Dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items())


class _LogBar(_NoBar):
    """A bar for logs: a start line, a line at most every ``interval`` seconds, an end line."""

    def __init__(self, total: int, desc: str, unit: str, file: TextIO, interval: float = LOG_INTERVAL_S) -> None:
        self.total, self.desc, self.unit, self.file, self.interval = int(total), desc, unit, file, interval
        self.n = 0
        self.postfix: Dict[str, Any] = {}
        self.t0 = self.last = time.monotonic()
        self.closed = False
        self._line(f"started, {self.total} {unit}")

    def _line(self, text: str) -> None:
        try:
            print(f"{self.desc}: {text}", file=self.file, flush=True)
        except (OSError, ValueError):  # a closed or broken log must not stop the work
            pass

    def _state(self, now: float) -> str:
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total > 0 else ""
        text = f"{self.n}/{self.total} {self.unit}{pct} in {now - self.t0:.1f} s"
        return f"{text}, {_format_postfix(self.postfix)}" if self.postfix else text

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units; writes a line only when ``interval`` seconds have passed."""
        self.n += int(n)
        now = time.monotonic()
        if now - self.last >= self.interval and not self.closed:
            self.last = now
            self._line(self._state(now))

    def set_postfix(self, **values: Any) -> None:
        """Values shown on the next line written (never a line of their own)."""
        self.postfix = values

    def close(self) -> None:
        """Write the end line (once)."""
        if not self.closed:
            self.closed = True
            self._line("done, " + self._state(time.monotonic()))


class _TtyBar(_NoBar):
    """A throttled tqdm bar whose postfix never forces a redraw."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def update(self, n: int = 1) -> None:
        """Count ``n`` more units (tqdm redraws at most every ``mininterval`` seconds)."""
        self.bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        """Values shown from the next throttled redraw on."""
        self.bar.set_postfix(refresh=False, **values)

    def close(self) -> None:
        """Remove the bar from the terminal."""
        self.bar.close()


def _in_notebook() -> bool:
    """True inside a Jupyter kernel (whose stderr is not a terminal but shows widgets)."""
    shell = sys.modules.get("IPython")
    if shell is None or "ipykernel" not in sys.modules:
        return False
    try:
        return type(shell.get_ipython()).__name__ == "ZMQInteractiveShell"
    except Exception:  # an IPython without a shell
        return False


def _is_tty(file: TextIO) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def progress_bar(total: int, desc: str, enabled: bool, unit: str = "it", *,
                 file: Optional[TextIO] = None) -> Any:
    """A progress bar over ``total`` units that suits where ``file`` goes (see the module doc).

    Args:
        total: units the bar counts to (``update(n)`` adds ``n``).
        desc: the bar's label, also the prefix of every log line.
        enabled: False gives a bar that writes nothing.
        unit: the units' name (``"batch"``, ``"img"``).
        file: where the bar writes; ``sys.stderr`` (looked up at the call) by default.
    Returns:
        An object with ``update(n)``, ``set_postfix(**values)`` and ``close()``; a context manager.
    """
    if not enabled:
        return _NoBar()
    stream = sys.stderr if file is None else file
    if _is_tty(stream) or (file is None and _in_notebook()):
        try:
            from tqdm.auto import tqdm
        except ImportError:  # tqdm is optional
            pass
        else:
            return _TtyBar(tqdm(total=total, desc=desc, unit=unit, leave=False, dynamic_ncols=True,
                                mininterval=TTY_INTERVAL_S, file=stream))
    return _LogBar(total, desc, unit, stream)
