"""The storage layer: git plumbing, the object store and its lock, metadata files, revisions, git-lfs transfer,
maintenance (fsck/gc), install/track."""
