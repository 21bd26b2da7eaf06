"""What ``import bitsandbytes`` and a 4-bit forward do when the ``kernels`` package cannot reach the Hub.

On CPUs with AVX512-BF16, bitsandbytes (0.50.2) asks ``kernels.get_kernel("kernels-community/...")`` for a
compiled 4-bit GEMM while it is being imported (so ``import peft`` does it too: peft imports bitsandbytes when
it is installed), and falls back to its bundled kernel if that fails. This script times that import and a
first ``Linear4bit`` forward (``eval()`` + ``no_grad``) in a fresh process per scenario, with a fresh
``HF_HOME`` (no cached kernel):

* ``offline``: ``HF_HUB_OFFLINE=1``;
* ``no_dns``: online mode, the Hub's name does not resolve (``HF_ENDPOINT=http://hub.invalid``);
* ``refused``: online mode, nothing listens at the Hub's address (a closed loopback port);
* ``silent``: online mode, the Hub's address accepts connections and never answers (a loopback server that
  holds every connection for ``--silent-seconds``, then closes it), as a stalling proxy or firewall does.

Each row: seconds to import bitsandbytes, seconds of the first forward, whether the weight was repacked
(``packing_format_for_cpu``), the largest difference of the output from the same forward with the
``kernels`` module hidden, and the warnings bitsandbytes printed. Prints one JSON object.

    python benchmarks/kernels_offline.py [--silent-seconds 120]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time

_CHILD = r"""
import json, sys, time
if sys.argv[1] == "hidden":
    sys.modules["kernels"] = None  # as if the package were not installed
start = time.perf_counter()
import bitsandbytes as bnb
imported = time.perf_counter()
import torch
torch.manual_seed(0)
layer = bnb.nn.Linear4bit(128, 64, bias=False, quant_type="nf4", compute_dtype=torch.float32)
layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4")
layer = layer.to("cpu").eval()
inputs = torch.randn(3, 128)
with torch.no_grad():
    before = time.perf_counter()
    output = layer(inputs)
    after = time.perf_counter()
torch.save(output, sys.argv[2])
print(json.dumps({"import_s": round(imported - start, 2), "forward_s": round(after - before, 4),
                  "packed": bool(getattr(layer.weight.quant_state, "packing_format_for_cpu", False)),
                  "avx512bf16": bool(bnb.functional.has_avx512bf16())}))
"""


def _silent_server(seconds: float) -> int:
    """A loopback port that accepts and never answers; each connection is closed after ``seconds``."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)

    def hold(connection: socket.socket) -> None:
        time.sleep(seconds)
        connection.close()

    def accept() -> None:
        while True:
            connection, _ = server.accept()
            threading.Thread(target=hold, args=(connection,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    return server.getsockname()[1]


def _closed_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


def _run(name: str, mode: str, env: dict, workdir: str, limit: float) -> dict:
    out = os.path.join(workdir, f"{name}.pt")
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", _CHILD, mode, out], env=env, capture_output=True, text=True,
                              timeout=limit)
    except subprocess.TimeoutExpired:
        return {"timed_out_after_s": limit}
    row = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-800:]}
    row["process_s"] = round(time.perf_counter() - start, 2)
    row["messages"] = [line for line in done.stderr.splitlines() if "kernels" in line.lower()]
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--silent-seconds", type=float, default=120.0,
                        help="how long the silent stand-in holds each connection")
    args = parser.parse_args()
    import torch

    try:
        import kernels  # noqa: F401

        kernels_version = __import__("importlib.metadata").metadata.version("kernels")
    except ImportError:
        kernels_version = None
    with tempfile.TemporaryDirectory(prefix="pica-kernels-offline-") as workdir:
        base = {k: v for k, v in os.environ.items() if not k.startswith("HF_")} | {"HF_HOME": workdir}
        scenarios = {
            "kernels_hidden": ("hidden", base | {"HF_HUB_OFFLINE": "1"}),
            "offline": ("visible", base | {"HF_HUB_OFFLINE": "1"}),
            "no_dns": ("visible", base | {"HF_ENDPOINT": "http://hub.invalid"}),
            "refused": ("visible", base | {"HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}),
            "silent": ("visible", base | {"HF_ENDPOINT": f"http://127.0.0.1:{_silent_server(args.silent_seconds)}"}),
        }
        rows = {name: _run(name, mode, env, workdir, args.silent_seconds * 3 + 60)
                for name, (mode, env) in scenarios.items()}
        reference = torch.load(os.path.join(workdir, "kernels_hidden.pt"), weights_only=True)
        for name, row in rows.items():
            if "error" not in row and "timed_out_after_s" not in row and name != "kernels_hidden":
                output = torch.load(os.path.join(workdir, f"{name}.pt"), weights_only=True)
                row["max_abs_diff_vs_hidden"] = float((output - reference).abs().max())
    versions = {name: __import__("importlib.metadata").metadata.version(name)
                for name in ("bitsandbytes", "huggingface_hub", "torch")}
    print(json.dumps({"command": " ".join(["python", *sys.argv]), "kernels": kernels_version, **versions,
                      "silent_seconds": args.silent_seconds, "scenarios": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
