"""A one-line progress bar with ETA for rank 0 when it writes to a terminal.

On a terminal the line is redrawn in place (carriage return): bar, step/total, steps/s, ETA and the
latest loss and θ. Anywhere else (a log file, a pipe, a batch job) `update` writes nothing: the
training loop's plain log lines are the record there, and `status()` gives them the rate and ETA.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TextIO

# (tag, short name) of the scalars shown on the bar; ASCII only, since a terminal may not be UTF-8.
SHOWN = (("train/loss", "loss"), ("train/pld_theta", "theta"))
BAR_WIDTH = 20
MIN_BAR_WIDTH = 5


def format_duration(seconds: float) -> str:
    """h:mm:ss, hours unbounded (a week is 168:00:00)."""
    total = max(int(round(seconds)), 0)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _columns(stream: TextIO) -> int:
    """Width of the terminal the stream writes to: COLUMNS if set, else the stream's own terminal, else 80."""
    env = os.environ.get("COLUMNS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:  # not shutil.get_terminal_size(): it asks stdout, which may be a file while the bar is on stderr
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class Progress:
    """Progress of a training run from `start_step` to `total_steps` optimizer steps.

    Call `update(step)` after every optimizer step (cheap: it redraws at most every `min_interval`
    seconds) and `update(step, scalars)` when scalars were computed. The rate, and so the ETA, counts
    from the first update of this process: the first step carries start-up and compilation, and a
    resumed run did its earlier steps in another process. `enabled=False` (ranks other than 0) turns
    every method into a no-op.
    """

    def __init__(self, total_steps: int, start_step: int = 0, *, enabled: bool = True, stream: TextIO | None = None,
                 interactive: bool | None = None, shown: Sequence[tuple[str, str]] = SHOWN,
                 min_interval: float = 0.1, clock: Callable[[], float] = time.monotonic) -> None:
        if total_steps < 1:
            raise ValueError(f"total_steps: expected >= 1, got {total_steps}")
        # start_step may exceed total_steps (a run resumed past its new --max-steps): nothing to show then.
        self.total_steps = total_steps
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.interactive = enabled and (_is_tty(self.stream) if interactive is None else interactive)
        self.shown = tuple(shown)
        self.min_interval = min_interval
        self._clock = clock
        self._step = start_step
        self._now = 0.0
        self._first: tuple[int, float] | None = None  # (step, time) of the first update
        self._scalars: dict[str, float] = {}
        self._drawn_at: float | None = None
        self._drawn_len = 0
        self._closed = False

    # -- numbers ---------------------------------------------------------------------------------
    def steps_per_sec(self) -> float | None:
        """Steps per second since the first update; None until there are two updates apart in time."""
        if self._first is None:
            return None
        first_step, first_time = self._first
        elapsed = self._now - first_time
        if self._step <= first_step or elapsed <= 0:
            return None
        return (self._step - first_step) / elapsed

    def eta_seconds(self) -> float | None:
        rate = self.steps_per_sec()
        return None if rate is None else (self.total_steps - self._step) / rate

    def status(self) -> str:
        """'12.5 steps/s  eta 0:03:10' (or '4.2 s/step' below one step a second; 'eta ?' before the rate
        is known): also for plain log lines."""
        rate, eta = self.steps_per_sec(), self.eta_seconds()
        if rate is None or eta is None:
            return "eta ?"
        speed = f"{rate:.3g} steps/s" if rate >= 1 else f"{1 / rate:.3g} s/step"
        return f"{speed}  eta {format_duration(eta)}"

    def line(self, columns: int = 200) -> str:
        """The bar line, at most columns - 1 characters: the numbers first, the bar gets what room is left."""
        fraction = min(self._step / self.total_steps, 1.0)
        info = "  ".join([f"step {self._step}/{self.total_steps}", self.status(),
                          *(f"{name} {self._scalars[tag]:.4g}" for tag, name in self.shown if tag in self._scalars)])
        percent = f"{fraction:4.0%}"
        width = min(BAR_WIDTH, columns - 1 - len(percent) - len(info) - 5)
        if width < MIN_BAR_WIDTH:
            return f"{percent}  {info}"[: max(columns - 1, 1)]
        filled = int(fraction * width)
        return f"{percent} [{'#' * filled}{'.' * (width - filled)}]  {info}"

    # -- output ----------------------------------------------------------------------------------
    def update(self, step: int, scalars: Mapping[str, float] | None = None) -> None:
        if not self.enabled or self._closed:
            return
        self._now = self._clock()
        self._step = step
        if self._first is None:
            self._first = (step, self._now)
        if scalars:
            self._scalars.update({k: float(v) for k, v in scalars.items()})
        due = self._drawn_at is None or self._now - self._drawn_at >= self.min_interval
        if self.interactive and (due or step >= self.total_steps):
            self._draw()

    def write(self, text: str, file: TextIO | None = None) -> None:
        """Print a log line (to stdout by default) without tearing the bar: clear it, print, redraw."""
        if not self.enabled:
            return
        drawn = self.interactive and self._drawn_len > 0 and not self._closed
        if drawn:
            self._clear()
        print(text, file=sys.stdout if file is None else file, flush=True)
        if drawn:
            self._draw()

    def close(self) -> None:
        """Leave the last state of the bar on its own line; idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.interactive and self._first is not None:
            self._draw()
            self.stream.write("\n")
            self.stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _draw(self) -> None:
        # A line longer than the terminal wraps, and a carriage return then redraws only its tail.
        text = self.line(_columns(self.stream))
        self.stream.write("\r" + text + " " * max(self._drawn_len - len(text), 0))
        self.stream.flush()
        self._drawn_len = len(text)
        self._drawn_at = self._now

    def _clear(self) -> None:
        self.stream.write("\r" + " " * self._drawn_len + "\r")
        self.stream.flush()
