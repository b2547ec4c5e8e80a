#!/usr/bin/env bash
# Reference tools the tests compare against, each in its own virtualenv under .reference/ (their dependency sets
# differ from ours): mergekit 0.1.5 (tests/e2e/test_vs_mergekit.py) and giftless 0.6.2, a git-lfs HTTP server
# (tests/integration/test_lfs_http.py). Tests that need a missing tool skip and say so.
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
# giftless's wheel declares no dependencies, so they are named here; pyjwt<2.10 because 2.10 rejects the anonymous
# upload tokens giftless signs ("sub": null), which fails every PUT with 401 (../shared/reference/lfs-server.md)
if [ ! -x .reference/giftless/bin/flask ]; then
  rm -rf .reference/giftless
  "$PY" -m venv .reference/giftless
  .reference/giftless/bin/python -m pip install -q giftless==0.6.2 flask flask-classful flask-marshmallow \
    marshmallow-enum webargs figcan pyyaml "pyjwt<2.10" python-dotenv cachetools python-dateutil cryptography \
    typing_extensions
fi
.reference/giftless/bin/python -c "import giftless.wsgi_entrypoint" >/dev/null
echo "reference tools: mergekit 0.1.5 in .reference/mergekit, giftless 0.6.2 in .reference/giftless"
