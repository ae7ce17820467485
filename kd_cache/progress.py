"""Progress of `kd cache build`, `kd train`, `kd eval` (and so `kd demo`): a tqdm bar on a terminal, plain lines in
logs.

Redirected to a file (CI, SLURM, `nohup`), a tqdm bar writes one `\\r` frame per update: thousands of them, one
unreadable line. `progress()` therefore returns a tqdm bar only when stderr is a terminal (or a Jupyter kernel's),
and otherwise a `LineProgress` with the same `update` / `set_postfix` / `close` API that prints one plain line
every `KD_PROGRESS_INTERVAL` seconds (default 30) and one when it closes:

    [2026-01-01 10:00:30] kd train dft: 120/500 step (24%), 4.01 step/s, elapsed 0:00:30, eta 0:01:35, loss=1.23

`KD_PROGRESS=bar` or `KD_PROGRESS=lines` forces either. `quiet_library_bars()` switches transformers' and
huggingface_hub's own bars (weight loading, downloads) off under the same condition.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, TextIO

from huggingface_hub.utils import disable_progress_bars
from tqdm.auto import tqdm
from transformers.utils import logging as hf_logging

DEFAULT_INTERVAL = 30.0


def stderr_is_terminal(stream: TextIO | None = None) -> bool:
    """Whether progress should be drawn as a bar: `KD_PROGRESS` if set (bar / lines), else whether the stream is a
    terminal or a Jupyter kernel's output (which renders tqdm.auto's widget)."""
    forced = os.environ.get("KD_PROGRESS", "").strip().lower()
    if forced in ("bar", "bars", "tqdm"):
        return True
    if forced in ("line", "lines", "log", "plain"):
        return False
    stream = sys.stderr if stream is None else stream
    if type(stream).__module__.startswith("ipykernel"):
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # closed or replaced by something without isatty
        return False


def _interval() -> float:
    try:
        value = float(os.environ.get("KD_PROGRESS_INTERVAL", DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return value if value >= 0 else DEFAULT_INTERVAL


def progress(total: int | None, initial: int = 0, desc: str = "", unit: str = "it", enabled: bool = True, *,
             stream: TextIO | None = None, interval: float | None = None):
    """A progress reporter for a loop of `total` units, `initial` of them already done (a resumed run); None when
    not `enabled`. A tqdm bar when stderr is a terminal, else a `LineProgress` (see the module docstring)."""
    if not enabled:
        return None
    stream = sys.stderr if stream is None else stream
    if stderr_is_terminal(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True, file=stream)
    return LineProgress(total, initial, desc, unit, stream=stream,
                        interval=_interval() if interval is None else interval)


def _hms(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class LineProgress:
    """tqdm's `update` / `set_postfix` / `close` as plain lines: one every `interval` seconds, one at the end."""

    def __init__(self, total: int | None, initial: int = 0, desc: str = "", unit: str = "it", *,
                 stream: TextIO | None = None, interval: float = DEFAULT_INTERVAL,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.n, self.desc, self.unit = total, initial, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.interval, self.clock = interval, clock
        self._start_n = initial
        self._t0 = self._last = clock()
        self._last_n = initial
        self._postfix = ""
        self.closed = False
        self.lines = 0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = self.clock()
        if now - self._last >= self.interval:
            self._emit(now)

    def set_postfix(self, ordered_dict: dict | None = None, refresh: bool = True, **kwargs: Any) -> None:
        items = dict(ordered_dict or {}, **kwargs)
        self._postfix = ", ".join(f"{k}={v}" for k, v in items.items())

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if self.lines == 0 or self.n != self._last_n:  # else the last line already said it all
                self._emit(self.clock(), final=True)

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _emit(self, now: float, final: bool = False) -> None:
        self._last, self._last_n = now, self.n
        elapsed = now - self._t0
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else None
        parts = [f"{self.n}/{self.total} {self.unit}" if self.total else f"{self.n} {self.unit}"]
        if self.total:
            parts[0] += f" ({100 * self.n / self.total:.0f}%)"
        if rate is not None:
            parts.append(f"{rate:.3g} {self.unit}/s")
        parts.append(f"elapsed {_hms(elapsed)}")
        if not final and rate and self.total and self.n < self.total:
            parts.append(f"eta {_hms((self.total - self.n) / rate)}")
        if self._postfix:
            parts.append(self._postfix)
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        end = " (stopped)" if final and self.total and self.n < self.total else ""
        try:
            print(f"[{stamp}] {self.desc}: {', '.join(parts)}{end}", file=self.stream, flush=True)
        except (ValueError, OSError):  # the stream was closed: progress is not worth an error
            return
        self.lines += 1


def quiet_library_bars(stream: TextIO | None = None) -> None:
    """When stderr is not a terminal, switch off transformers' and huggingface_hub's own progress bars (weight
    loading, downloads), which would write `\\r` frames into the log. Process-wide, like their own switches."""
    if stderr_is_terminal(stream):
        return
    try:
        hf_logging.disable_progress_bar()
    except ImportError:
        pass
    try:
        disable_progress_bars()
    except ImportError:
        pass
