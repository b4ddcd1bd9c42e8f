#!/usr/bin/env bash
# Create .venv and install patchcore with its test tools. PyTorch comes from pip (torch<=2.14.1 and
# torchvision<=0.29.1 are pinned by the project, so pip picks the wheels this machine carries).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]"
