#!/usr/bin/env bash
# Create .venv and install patchcore with its test tools. PyTorch comes from pip (torch<=2.14.1 and
# torchvision<=0.29.1 are pinned by the project, so pip picks the wheels this machine carries).
# --all: also every optional extra (service, export runtimes, Ray, the W&B / MLflow trackers) and Debian's Chromium for the browser
# tests: what CI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
EXTRAS="dev"
if [ "${1:-}" = "--all" ]; then
    EXTRAS="dev,serve,export,ray,tracking"
    if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
        if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
            apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
        else
            echo "setup: chromium/chromedriver missing and not root: browser tests will be skipped" >&2
        fi
    fi
fi
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[$EXTRAS]"
