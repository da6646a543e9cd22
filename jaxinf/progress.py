"""Progress of long stages, visible whether or not the output is a terminal.

On a terminal (stderr is a tty) a stage is a tqdm bar. Otherwise (CI logs, `| tee`, notebooks' captured
output) it is plain timestamped lines on stderr: one when the stage starts, one at most every `every` seconds
while it runs (count / total and elapsed time), and one when it ends with its wall time:

    19:20:01 fine-tune: start (18 step)
    19:20:11 fine-tune: 7/18 step, 10.2 s, loss=0.913
    19:20:27 fine-tune: done 18/18 step in 26.0 s

`JAXINF_PROGRESS=0` silences every stage; `JAXINF_PROGRESS=plain` forces plain lines on a terminal too.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional

from tqdm.auto import tqdm


def _mode() -> str:
    """'off', 'plain' or 'bar' from JAXINF_PROGRESS and whether stderr is a terminal."""
    env = os.environ.get("JAXINF_PROGRESS", "").strip().lower()
    if env in ("0", "off", "false", "no"):
        return "off"
    if env == "plain":
        return "plain"
    isatty = getattr(sys.stderr, "isatty", None)
    return "bar" if isatty is not None and isatty() else "plain"


def log(message: str) -> None:
    """One timestamped line on stderr (unless JAXINF_PROGRESS=0)."""
    if _mode() != "off":
        print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def warn(message: str) -> None:
    """One timestamped warning line on stderr, shown even when JAXINF_PROGRESS=0 silences the stages."""
    print(f"{time.strftime('%H:%M:%S')} WARNING: {message}", file=sys.stderr, flush=True)


def _seconds(s: float) -> str:
    return f"{s:.1f} s" if s < 120 else f"{s / 60:.1f} min"


class Stage:
    """A named stage with an optional total count: `with stage("gradients", total=48, unit="row") as p: p.update(8)`.

    `enabled=False` shows nothing (library calls made inside a larger stage). `elapsed` is the wall time so far.
    """

    def __init__(self, desc: str, total: Optional[int] = None, *, unit: str = "step", initial: int = 0,
                 enabled: bool = True, every: float = 10.0):
        self.desc, self.total, self.unit, self.n, self.every = desc, total, unit, int(initial), float(every)
        self.mode = _mode() if enabled else "off"
        self.start = self._last = time.perf_counter()
        self.postfix: dict = {}
        self._closed = False
        self._bar = None
        if self.mode == "bar":
            self._bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=True)
        elif self.mode == "plain":
            size = f" ({total} {unit})" if total is not None else ""
            resumed = f", resuming at {initial}" if initial else ""
            log(f"{desc}: start{size}{resumed}")

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def _count(self) -> str:
        return f"{self.n}/{self.total} {self.unit}" if self.total is not None else f"{self.n} {self.unit}"

    def _post(self) -> str:
        return "".join(f", {k}={v}" for k, v in self.postfix.items())

    def update(self, n: int = 1, **postfix) -> None:
        """Advance by `n`; keyword values (e.g. loss=...) are shown with the count."""
        self.n += n
        if postfix:
            self.postfix = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()}
        if self._bar is not None:
            self._bar.update(n)
            if postfix:
                self._bar.set_postfix(self.postfix)
        elif self.mode == "plain":
            now = time.perf_counter()
            if now - self._last >= self.every and (self.total is None or self.n < self.total):
                self._last = now
                log(f"{self.desc}: {self._count()}, {_seconds(now - self.start)}{self._post()}")

    def close(self, note: str = "") -> float:
        """End the stage (once) with a line saying `note` (default "done"); returns its wall seconds."""
        seconds = self.elapsed
        if self._closed:
            return seconds
        self._closed = True
        if self._bar is not None:
            self._bar.close()
            if note:
                log(f"{self.desc}: {note}")
        elif self.mode == "plain":
            count = f" {self._count()}" if self.total is not None or self.n else ""
            log(f"{self.desc}: {note or 'done'}{count} in {_seconds(seconds)}{self._post()}")
        return seconds

    def __enter__(self) -> "Stage":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True
            if self._bar is not None:
                self._bar.close()
            if self.mode != "off":
                log(f"{self.desc}: stopped after {_seconds(self.elapsed)} ({exc_type.__name__})")


def stage(desc: str, total: Optional[int] = None, **kwargs) -> Stage:
    """A `Stage` (see there); use as a context manager."""
    return Stage(desc, total, **kwargs)
