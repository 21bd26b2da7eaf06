#!/usr/bin/env bash
# Set up, then run the main job: PiCa fine-tuning of all-MiniLM-L6-v2 on tweet sentiment, offline.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python examples/quickstart.py "$@"
