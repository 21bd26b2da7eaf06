"""Run a benchmark script as users do (a subprocess, offline) and return the JSON it printed and wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_benchmark(name: str, *args: str, out: Path, timeout: int = 300) -> dict:
    """``python benchmarks/<name> *args --out out``; asserts it exits 0, prints the object it writes to ``out``
    and records its own command line; returns that object."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    completed = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args, "--out", str(out)],
                               check=False, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stderr[-3000:]
    result = json.loads(out.read_text())
    assert json.loads(completed.stdout) == result  # stdout carries the same object
    assert name in result["machine"]["command"]
    return result
