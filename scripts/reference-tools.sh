#!/usr/bin/env bash
# Reference tools the tests compare against, each in its own virtualenv under .reference/ (their dependency sets
# differ from ours): mergekit 0.1.5 (tests/test_vs_mergekit.py). Tests that need a missing tool skip and say so.
# torch==2.13.0 first, as in setup.sh: it is a local CPU wheel; mergekit's plain `torch` would pull a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ ! -x .reference/mergekit/bin/mergekit-yaml ]; then
  rm -rf .reference/mergekit
  "$PY" -m venv .reference/mergekit
  .reference/mergekit/bin/python -m pip install -q "torch==2.13.0"
  .reference/mergekit/bin/python -m pip install -q "mergekit==0.1.5"
fi
.reference/mergekit/bin/mergekit-yaml --help >/dev/null
echo "reference tools: mergekit 0.1.5 in .reference/mergekit"
