#!/usr/bin/env bash
# Set up (if needed) and run the test suite (slow checks excluded; see pyproject markers).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
