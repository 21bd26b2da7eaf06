"""Multi-process training with PiCa: DDP through transformers Trainer, and FSDP wrapping policies.

Each test launches ``torchrun --nproc_per_node=2`` (gloo, CPU) on a script in this package.
Marked ``multiprocess`` (deselect with ``-m "not multiprocess"``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.multiprocess

ROOT = Path(__file__).resolve().parents[2]
STEPS, GLOBAL_BATCH = 6, 4


def _torchrun(processes: int, module: str, *args: str, timeout: int = 240) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", module, *args]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]


def test_ddp_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    from tests.distributed.train_script import main as train

    runs = {}
    for processes in (1, 2):
        out = tmp_path / f"world{processes}"
        if processes == 1:  # the reference: this process, no torch.distributed, one thread like the workers
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                train(str(out), GLOBAL_BATCH, STEPS)
            finally:
                torch.set_num_threads(threads)
        else:
            _torchrun(processes, "tests.distributed.train_script", str(out), str(GLOBAL_BATCH), str(STEPS))
        runs[processes] = (json.loads((out / "run.json").read_text()),
                           [load_file(out / f"updates_rank{rank}.safetensors") for rank in range(processes)])
    (single, [single_updates]), (double, double_updates) = runs[1], runs[2]
    assert single["world_size"] == 1 and double["world_size"] == 2
    assert double["wrapper"] == "DistributedDataParallel"
    assert set(single_updates) == set(double_updates[0]) and len(single_updates) == 5  # one M per group
    for group, expected in single_updates.items():
        assert expected.abs().max() > 1e-3  # trained, not still zero
        assert torch.equal(double_updates[0][group], double_updates[1][group])  # ranks agree exactly
        relative = float((double_updates[0][group] - expected).norm() / expected.norm())
        assert relative <= 1e-6, (group, relative)  # measured ≤ 3.0e-7
    assert len(single["losses"]) == len(double["losses"]) == STEPS
    assert all(abs(a - b) <= 1e-6 * abs(a) for a, b in zip(single["losses"], double["losses"]))


def test_fsdp_every_wrapping_equals_one_process(tmp_path):
    out = tmp_path / "fsdp.json"
    _torchrun(2, "tests.distributed.fsdp_script", str(out))
    results = json.loads(out.read_text())
    assert len(results) == 8
    for name, result in results.items():
        assert result["ok"], (name, result.get("error"))
        assert result["max_relative_difference"] <= 1e-5, (name, result)
