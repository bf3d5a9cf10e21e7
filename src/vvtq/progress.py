"""Progress of a long loop: a tqdm bar on a terminal, a plain line every few steps in a log (timm's style).

A log file that receives tqdm's carriage-return frames holds hundreds of them; ``progress_bar`` writes a
bar only when stderr is a terminal, and otherwise one line per ``every`` steps and one at the end.
"""
from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO


class LineProgress:
    """``desc [n/total]  key value ...  (elapsed)``, every ``every`` updates and at the last one."""

    def __init__(self, total: int, desc: str, every: int = 20, stream: TextIO | None = None):
        self.total, self.desc, self.every = int(total), desc, max(1, int(every))
        self.stream = stream if stream is not None else sys.stderr
        self.n, self.postfix, self.due, self.t0 = 0, {}, False, time.time()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.due = self.due or self.n % self.every == 0 or self.n == self.total

    def set_postfix(self, **values: Any) -> None:
        """The values of the current step: printed now if a line is due."""
        self.postfix = values
        self._flush()

    def close(self) -> None:
        self._flush()

    def _flush(self) -> None:
        if not self.due:
            return
        self.due = False
        width = len(str(self.total))
        values = "  ".join(f"{k} {v}" for k, v in self.postfix.items())
        print(f"{self.desc} [{self.n:>{width}}/{self.total}]  {values}  ({time.time() - self.t0:.0f} s)".rstrip(),
              file=self.stream, flush=True)


def progress_bar(enabled: bool, total: int, desc: str, every: int = 20) -> Any:
    """A progress display for ``total`` steps with ``update``, ``set_postfix`` and ``close``: a tqdm bar when
    stderr is a terminal, else a ``LineProgress``; None when not ``enabled``."""
    if not enabled:
        return None
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)
    return LineProgress(total, desc, every)


def progress(items: Iterable, enabled: bool, total: int, desc: str, every: int = 20) -> Iterator:
    """``items``, with a progress display of ``total`` steps (see ``progress_bar``)."""
    bar = progress_bar(enabled, total, desc, every)
    for item in items:
        yield item
        if bar is not None:
            bar.update(1)
            bar.set_postfix()
    if bar is not None:
        bar.close()
