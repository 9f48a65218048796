"""What ``send`` shows while it works: a bar on a terminal, one summary line otherwise.

``render`` is pure (counts, elapsed time, width in; one line out) so tests need no terminal;
``Progress`` redraws it on the terminal at most ten times a second.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TextIO

MB = 1e6


def render(files: int, total_files: int, nbytes: int, total_bytes: int, elapsed: float, width: int = 80) -> str:
    """``[#####-----]  12/200 files  6.3/105.0 MB  21.0 MB/s  40 files/s`` fitted to ``width``."""
    rate = nbytes / MB / elapsed if elapsed > 0 else 0.0
    file_rate = files / elapsed if elapsed > 0 else 0.0
    text = (f"  {files}/{total_files} files  {nbytes / MB:.1f}/{total_bytes / MB:.1f} MB"
            f"  {rate:.1f} MB/s  {file_rate:.0f} files/s")
    bar_width = max(10, min(40, width - len(text) - 3))
    done = total_bytes and nbytes / total_bytes or (files / total_files if total_files else 1.0)
    filled = int(round(bar_width * min(1.0, max(0.0, done))))
    return ("[" + "#" * filled + "-" * (bar_width - filled) + "]" + text)[: max(20, width - 1)]


def summary(queued: int, skipped: int, dest: str, nbytes: int, elapsed: float) -> str:
    """The one line ``send`` prints when it is done (and the only one when stderr is not a terminal)."""
    rate = nbytes / MB / elapsed if elapsed > 0 else 0.0
    return (f"{queued} instance(s) queued for {dest}, {skipped} skipped "
            f"({nbytes / MB:.1f} MB in {elapsed:.1f} s, {rate:.1f} MB/s)")


class Progress:
    """Redraws ``render`` on a terminal stream with a carriage return, throttled."""

    def __init__(self, stream: TextIO, total_files: int, total_bytes: int,
                 width: int = 80, clock: Callable[[], float] = time.monotonic):
        self.stream, self.total_files, self.total_bytes, self.width = stream, total_files, total_bytes, width
        self.clock = clock
        self.start = clock()
        self.files = self.nbytes = 0
        self._drawn = 0.0

    def __call__(self, path) -> None:
        """One more file handled (queued or skipped)."""
        self.files += 1
        try:
            self.nbytes += path.stat().st_size
        except OSError:
            pass
        now = self.clock()
        if now - self._drawn >= 0.1 or self.files == self.total_files:
            self._drawn = now
            self.draw()

    def draw(self) -> None:
        line = render(self.files, self.total_files, self.nbytes, self.total_bytes,
                      self.clock() - self.start, self.width)
        self.stream.write("\r" + line + "\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        self.draw()
        self.stream.write("\n")
        self.stream.flush()
