"""Run-time measurements for the harness: peak memory, and a progress bar for projector init."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Iterator, Optional

import psutil
import torch

__all__ = ["PeakMemory", "projector_progress"]


def _rss_bytes() -> int:
    """Resident set size of this process now (psutil: Linux, macOS, Windows)."""
    return psutil.Process().memory_info().rss


class PeakMemory:
    """Peak memory inside a ``with`` block: CUDA max allocated if a GPU is used, else the peak
    resident set size of the process sampled every ``interval`` seconds.

    The sampler is ours: psutil reads the resident set size now, and the operating system's own peak
    (``ru_maxrss``, psutil's ``peak_wset`` on Windows) covers the whole life of the process, not a window.

    Attributes:
        peak_mb: the peak in MiB after the block.
        kind: ``"cuda_max_allocated"`` or ``"cpu_peak_rss"``.
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.peak_mb: float = 0.0
        self.kind = "cuda_max_allocated" if torch.cuda.is_available() else "cpu_peak_rss"
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._peak = 0

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> "PeakMemory":
        if self.kind == "cuda_max_allocated":
            torch.cuda.reset_peak_memory_stats()
        else:
            self._peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.kind == "cuda_max_allocated":
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_mb = max(self._peak, _rss_bytes()) / 2**20


class _ProjectorBar(logging.Handler):
    """Advances a tqdm bar on the tuner's ``PiCa projector i/n`` debug records."""

    def __init__(self, enabled: bool) -> None:
        super().__init__(level=logging.DEBUG)
        self.enabled = enabled
        self.bar = None

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith("PiCa projector") or len(record.args or ()) < 2:
            parent = logging.getLogger("pica.tuner")
            if record.levelno >= parent.getEffectiveLevel():
                parent.handle(record)  # what propagation would have done
            return
        index, total = record.args[0], record.args[1]
        if self.bar is None:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="PiCa projectors", unit="layer", disable=not self.enabled)
        self.bar.update(index - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        super().close()


@contextlib.contextmanager
def projector_progress(enabled: bool = True) -> Iterator[None]:
    """Show a progress bar while PiCa computes its projectors (listens to ``pica.tuner.plan``)."""
    plan_logger = logging.getLogger("pica.tuner.plan")
    handler = _ProjectorBar(enabled)
    previous, propagate = plan_logger.level, plan_logger.propagate
    plan_logger.addHandler(handler)
    plan_logger.setLevel(logging.DEBUG)
    plan_logger.propagate = False
    started = time.perf_counter()
    try:
        yield
    finally:
        plan_logger.removeHandler(handler)
        plan_logger.setLevel(previous)
        plan_logger.propagate = propagate
        handler.close()
        logging.getLogger(__name__).debug("projector init %.2f s", time.perf_counter() - started)

