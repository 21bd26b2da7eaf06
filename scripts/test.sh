#!/usr/bin/env bash
# Set up (if needed) and run the test suite (slow checks excluded; see pyproject markers), then, for a
# full run (no arguments):
# * PiCa against PEFT's own test suite, fast set (scripts/peft_conformance.sh: downloads peft's sdist once,
#   about 2 minutes on 2 cores; its summary goes to a temporary file, not into the repository;
#   PICA_CONFORMANCE_FULL=1 bash scripts/peft_conformance.sh runs the full contract);
# * the suite again in .venv-newest with the newest releases pyproject.toml allows, resolved at run time
#   (torch kept at the pinned CPU build): users install pica beside whatever is newest. A failure fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
HF_HUB_OFFLINE=1 .venv/bin/python -m pytest -q "$@"
if [[ $# -eq 0 ]]; then
    summary="$(mktemp "${TMPDIR:-/tmp}/peft-conformance.XXXXXX.json")"
    PICA_CONFORMANCE_OUT="$summary" bash scripts/peft_conformance.sh
    echo "PEFT conformance summary: $summary"
    start=$SECONDS
    PICA_VENV=.venv-newest PICA_VERSIONS=newest bash scripts/setup.sh
    echo "newest releases: $(.venv-newest/bin/python -m pip list --format=freeze 2>/dev/null \
        | grep -i -E '^(torch|peft|transformers|accelerate|trl|datasets|bitsandbytes|kernels|huggingface.hub)==' \
        | tr '\n' ' ')"
    HF_HUB_OFFLINE=1 .venv-newest/bin/python -m pytest -q -p no:cacheprovider
    echo "newest-releases run: $((SECONDS - start)) s (setup and suite)"
fi
