#!/usr/bin/env bash
# Set up (if needed) and run the test suite (slow checks excluded; see pyproject markers), then, for a
# full run (no arguments), PiCa against PEFT's own test suite, fast set (scripts/peft_conformance.sh: downloads
# peft's sdist once, about 2 minutes on 2 cores; its summary goes to a temporary file, not into the repository;
# PICA_CONFORMANCE_FULL=1 bash scripts/peft_conformance.sh runs the full contract).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
if [[ $# -eq 0 ]]; then
    summary="$(mktemp "${TMPDIR:-/tmp}/peft-conformance.XXXXXX.json")"
    PICA_CONFORMANCE_OUT="$summary" bash scripts/peft_conformance.sh
    echo "PEFT conformance summary: $summary"
fi
