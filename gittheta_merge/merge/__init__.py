"""Merging fine-tuned models tensor by tensor.

The engine (engine.py) streams over the union of tensor names and hands row chunks of the M models (and
the base) to a strategy (strategies/*, found through the `gittheta_merge.strategies` entry-point group).
Sources of tensors are either git-theta metadata + the object store, or plain safetensors files
(sources.py), so the git merge driver, `git theta merge` and the Python API share one engine.
"""

from gittheta_merge.merge.engine import merge_models
from gittheta_merge.merge.plan import MergeOptions, MergeResult
from gittheta_merge.merge.rules import Rule, parse_rule

__all__ = ["MergeOptions", "MergeResult", "Rule", "merge_models", "parse_rule"]
