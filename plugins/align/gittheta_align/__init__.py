"""Permutation alignment for models trained from different initializations (Verma & Elbayad 2024, "Merging Text
Transformer Models from Different Initializations"): B's weights are permuted into A's coordinates, site by site,
from the two models' joint feature statistics on the same text, so that merging them afterwards averages matching
features rather than unrelated ones.

Layers: bert.py (where each tensor sits), features.py (joint statistics), matching.py (permutations),
permute.py (applying them), cli.py (`git theta align`)."""
