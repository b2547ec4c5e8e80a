"""Statistics that travel with the weights: Fisher, input Gram and K-FAC blobs for data-aware merges.

`compute_statistic` (compute.py) produces a `Statistic` (sums + counts + provenance); `save_statistic` /
`statistic_to_bytes` (blobs.py) turn it into a safetensors blob; `iter_examples` / `file_digest` (data.py) stream
the data and fingerprint it. See docs/statistics.md.
"""

from .batches import LABEL_POLICIES, TASKS, load_model
from .blobs import load_statistic, read_provenance, save_statistic, statistic_from_bytes, statistic_to_bytes
from .compute import compute_fisher, compute_gram, compute_kfac, compute_statistic
from .data import DataSpec, Example, file_digest, iter_examples
from .statistic import KINDS, Statistic

__all__ = ["KINDS", "LABEL_POLICIES", "TASKS", "DataSpec", "Example", "Statistic", "compute_fisher", "compute_gram",
           "compute_kfac", "compute_statistic", "file_digest", "iter_examples", "load_model", "load_statistic",
           "read_provenance", "save_statistic", "statistic_from_bytes", "statistic_to_bytes"]
