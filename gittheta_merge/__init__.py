"""gittheta-merge: version machine-learning checkpoints in git, one object per tensor, and merge them."""

__version__ = "0.1.0"
