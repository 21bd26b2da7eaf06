#!/usr/bin/env bash
# PiCa against PEFT's own test suite, as a contributor would run it (tiny models, CPU, offline after the
# first run). Downloads the peft sdist of the installed (pinned) version into a cache, extracts its tests/
# into a scratch directory, and runs test_custom_models.py, test_config.py and test_decoder_models.py with the
# PiCa rows and tests added at collection time by scripts/peft_conformance/pica_conformance (no peft file is
# edited or stored here). The decoder tests' Hub models are replaced by local random stand-ins of the same
# architectures (pica_conformance/standins.py), built once into the cache.
#
#   bash scripts/peft_conformance.sh [extra pytest args, e.g. -k "Vanilla and MLP"]
#
# Env: PYTHON (default .venv/bin/python), PICA_CONFORMANCE_CACHE (default ~/.cache/pica/peft_conformance),
#      PICA_CONFORMANCE_OUT (default benchmarks/results/peft_conformance.json),
#      PICA_CONFORMANCE_FULL=1: the full contract (every PiCa row, decoder tests on all six stand-ins); default:
#      the fast set run by scripts/test.sh (fewer custom-model rows, decoder tests on GPT-2 and Llama),
#      PICA_CONFORMANCE_FILES: the peft test files to run (default: the three above).
# Exit status: pytest's; non-zero if a PiCa item failed or an expectation in
# scripts/peft_conformance/pica_conformance/expectations.py matched nothing.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
CACHE="${PICA_CONFORMANCE_CACHE:-$HOME/.cache/pica/peft_conformance}"
OUT="${PICA_CONFORMANCE_OUT:-$ROOT/benchmarks/results/peft_conformance.json}"
DIFFUSERS_VERSION=0.42.1  # testing_common.py imports diffusers; installed --no-deps into the cache only

PEFT_VERSION="$("$PYTHON" -c 'import peft; print(peft.__version__)')"
SDIST="$CACHE/peft-$PEFT_VERSION.tar.gz"
mkdir -p "$CACHE"
if [[ ! -f "$SDIST" ]]; then
    echo "downloading the peft $PEFT_VERSION sdist (ships tests/) into $CACHE" >&2
    "$PYTHON" -m pip download --quiet "peft==$PEFT_VERSION" --no-binary :all: --no-deps -d "$CACHE"
fi
SITE="$CACHE/site-diffusers-$DIFFUSERS_VERSION"
if [[ ! -d "$SITE/diffusers" ]]; then
    echo "installing diffusers $DIFFUSERS_VERSION --no-deps into $SITE (imported by peft's testing_common.py)" >&2
    "$PYTHON" -m pip install --quiet --no-deps --target "$SITE.partial" "diffusers==$DIFFUSERS_VERSION"
    rm -rf "$SITE" && mv "$SITE.partial" "$SITE"
fi

TRANSFORMERS_VERSION="$("$PYTHON" -c 'import transformers; print(transformers.__version__)')"
STANDINS_VERSION="$(PYTHONPATH="$ROOT/scripts/peft_conformance" "$PYTHON" -c 'from pica_conformance.standins import VERSION; print(VERSION)')"
STANDINS="$CACHE/stand-ins-v$STANDINS_VERSION-transformers-$TRANSFORMERS_VERSION"  # built by the plugin if missing

WORK="$(mktemp -d "${TMPDIR:-/tmp}/pica-peft-conformance.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
tar -xzf "$SDIST" -C "$WORK" "peft-$PEFT_VERSION/tests" "peft-$PEFT_VERSION/pyproject.toml"
SUITE="$WORK/peft-$PEFT_VERSION"
# peft's pyproject turns transformers' FutureWarnings into errors, and peft 0.21.2 calls two names that the
# installed transformers 5.x deprecates: PeftModel.__init__ reads model.is_gradient_checkpointing (so every
# get_peft_model on a transformers model, any method, would fail test_decoder_models.py) and testing_common.py
# calls model.gradient_checkpointing_enable. -W filters apply after the ini ones: these two messages only are
# ignored.
# The sdist's tests/ lacks the package marker its relative imports need (peft's git repo has one).
touch "$SUITE/tests/__init__.py"

FULL="${PICA_CONFORMANCE_FULL:-}"
[[ "$FULL" == 0 ]] && FULL=""
FILES="${PICA_CONFORMANCE_FILES:-tests/test_custom_models.py tests/test_config.py tests/test_decoder_models.py}"
COMMAND="${FULL:+PICA_CONFORMANCE_FULL=1 }bash scripts/peft_conformance.sh${*:+ $*}"
cd "$SUITE"
set +e
HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
PYTHONPATH="$ROOT/scripts/peft_conformance:$ROOT/src:$SITE${PYTHONPATH:+:$PYTHONPATH}" \
    "$PYTHON" -m pytest -p pica_conformance.plugin -o addopts="" -p no:cacheprovider -q -rN \
    -W 'ignore:`is_gradient_checkpointing` is deprecated:FutureWarning' \
    -W 'ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning' \
    --pica-peft-version "$PEFT_VERSION" --pica-summary "$OUT" --pica-command "$COMMAND" \
    --pica-standins "$STANDINS" ${FULL:+--pica-full} \
    $FILES "$@"
STATUS=$?
set -e
echo "summary: $OUT" >&2
exit $STATUS
