"""Defaults that more than one layer uses, each stated once with why it has its value."""

from __future__ import annotations

# The largest stored object (git config theta.blockBytes): a tensor above it is split into row blocks, so the
# clean, the smudge and a merge hold at most one block of it; 64 MiB keeps a block well inside any machine's
# memory while a 7B model is still only a few hundred objects.
BLOCK_BYTES = 64 << 20

# The merge engine reads at least one whole row of a tensor at a time (strategies work on rows), so a tensor whose
# single row is larger than this in float32 (a [1, 2**34] tensor: 64 GB) is refused by the plan with a rule to keep
# one side, instead of running out of memory; stored, it is split into byte ranges and adds and checks out fine.
MAX_MERGE_ROW_BYTES = 1 << 30

# The merge engine's working chunk in float32 bytes (merge setting max_block_bytes, --max-block-bytes): peak memory
# is about (models + 1 + a strategy's temporaries) of these. Same size as a stored block, so one block is one chunk.
MERGE_CHUNK_BYTES = 64 << 20

# A git blob larger than this is never a metadata file: walks over history skip it unread.
MAX_METADATA_BYTES = 64 << 20
