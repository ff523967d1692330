"""Peak resident memory of a child process and its descendants, sampled every 0.1 s (benchmarks only)."""

from __future__ import annotations

import threading

import psutil


def tree_rss(proc: psutil.Process) -> int:
    """RSS bytes of ``proc`` and all its descendants now (0 if it just ended)."""
    total = 0
    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # the process just ended
        return 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakRss:
    """``with PeakRss(pid) as m: ...`` samples the process tree until the block ends; ``m.peak`` in bytes."""

    def __init__(self, pid: int) -> None:
        self._proc, self._done, self.peak = psutil.Process(pid), threading.Event(), 0
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, tree_rss(self._proc))
            self._done.wait(0.1)

    def __enter__(self) -> "PeakRss":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
