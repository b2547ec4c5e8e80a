"""git's clean/smudge filter: pkt-line framing and the long-running process."""
