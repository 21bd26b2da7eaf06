"""Helpers shared by the benchmark scripts (machine info, timing, peak tensor memory)."""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def machine_info() -> dict:
    """Machine, library versions, thread counts and the exact command line."""
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {
        "command": " ".join(shlex.quote(arg) for arg in [sys.executable, *sys.argv]),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def interleaved_medians(variants: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, dict]:
    """Time each variant ``repeats`` times, one repetition of every variant per round (rotating the
    order each round), after ``warmup`` untimed rounds. Returns median/min/all seconds per variant and
    the median over rounds of its time divided by the first variant's time in the same round."""
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        order = names[round_index % len(names):] + names[: round_index % len(names)]
        for name in order:
            start = time.perf_counter()
            variants[name]()
            samples[name].append(time.perf_counter() - start)
    reference = names[0]
    return {name: {"median_s": statistics.median(v), "min_s": min(v), "samples_s": [round(t, 5) for t in v],
                   "median_paired_ratio": statistics.median(t / b for t, b in zip(v, samples[reference]))}
            for name, v in samples.items()}


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created by aten ops while active (forward, backward, grads).

    Each op's output storages are counted when created and uncounted once freed (weak references
    checked at every op), so the peak covers saved activations and transient tensors alike; tensors
    that existed before (weights, inputs) are not counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def _collect(self) -> None:
        for key, (ref, size) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self._collect()
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key and key not in self.live:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def peak_tensor_bytes(step: Callable[[], None]) -> int:
    """Peak live bytes of the tensors one call of ``step`` creates (see :class:`PeakTensorMemory`)."""
    with PeakTensorMemory() as tracker:
        step()
    return tracker.peak


def saved_for_backward_bytes(forward: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``forward()`` (activation
    memory a network holds per layer between forward and backward), parameters and inputs included."""
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = forward()
    del out
    return sum(seen.values())


def emit(result: dict, out: Path | None) -> None:
    """Print ``result`` as JSON on stdout and, if ``out`` is given, write the same text there (folders made)."""
    text = json.dumps(result, indent=1)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")
