#!/usr/bin/env bash
# Set up, then run the main job: `pica demo` (all-MiniLM-L6-v2 on tweet sentiment: linear probe, PiCa,
# LoRA and full fine-tuning compared in one harness), fully offline. Extra arguments go to `pica demo`
# (e.g. --quick, --help).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/pica demo "$@"
