"""What every multi-process test script does around its work: a hang watchdog, and rank 0 publishing the results."""

from __future__ import annotations

import faulthandler
import json
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

HANG_DUMP_S = 180  # below the tests' torchrun timeout (240 s)


def start() -> tuple[int, torch.Tensor, torch.Tensor]:
    """Join the 2-rank gloo group; return ``(rank, batch, local)``: the global ``(4, 12)`` token batch every
    rank draws alike, and this rank's half of it."""
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    assert world == 2, world
    batch = torch.randint(1, 96, (4, 12), generator=torch.Generator().manual_seed(1))  # (global batch, length)
    return rank, batch, batch.chunk(world)[rank]


def publish(results: dict[str, Any], out_file: str) -> None:
    """Rank 0 writes ``results`` as JSON to ``out_file``; every rank waits for it, then leaves the process group."""
    if dist.get_rank() == 0:
        with open(out_file, "w") as handle:
            json.dump(results, handle, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def run(main: Callable[..., None], *args: Any) -> None:
    """Call ``main(*args)``; a hang dumps every thread's stack and exits after :data:`HANG_DUMP_S` seconds."""
    faulthandler.dump_traceback_later(HANG_DUMP_S, exit=True)
    main(*args)
